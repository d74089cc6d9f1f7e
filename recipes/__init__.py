"""Every recipe, in the order their jobs build on each other."""

from recipes import chat_sl, distillation, dpo, math_rl, sl_basic

RECIPES = [sl_basic.RECIPE, chat_sl.RECIPE, dpo.RECIPE, math_rl.RECIPE, distillation.RECIPE]
