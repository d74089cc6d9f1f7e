"""The `base/` group that every embedded default chain starts from: a byte-level BPE
tokenizer with a ChatML template, trained on a corpus covering every default task, with
numbers split into single digits as Llama's and Qwen's tokenizers split them (a sum the model
never saw is then made of digits it did see, so held-out arithmetic is learnable), and tiny
Llama-architecture models built from a config on it, saved in HF format so every later
stage treats them exactly like hub models."""

from pathlib import Path
from typing import TYPE_CHECKING

from dagster import AssetExecutionContext, AssetIn, Config, Output, asset

from crucible_assets.caching import cached_artifact, key
from resources.datasets.synthetic import tokenizer_corpus
from resources.hf_io import quiet_progress_bars
from resources.store.artifact_store import ArtifactRef, ArtifactStore

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML: each turn is <|im_start|>role\ncontent<|im_end|>\n; <|im_end|> ends a turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(out_dir: Path, vocab_size: int, seed: int) -> "PreTrainedTokenizerFast":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(seed), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        bos_token=None,
        model_max_length=2048,
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_llama(
    tokenizer_dir: Path,
    out_dir: Path,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int,
) -> int:
    """Randomly initialised (seeded) Llama on the base tokenizer; returns the parameter count."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    quiet_progress_bars()
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    stop_ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=stop_ids,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())




class TokenizerConfig(Config):
    vocab_size: int = 1024
    seed: int = 0


class TinyModelConfig(Config):
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 688
    max_position_embeddings: int = 512
    seed: int = 0


@asset(key=key("base", "tokenizer"), group_name="base", code_version="3", kinds={"huggingface"},
       description="Byte-level BPE trained on a corpus covering every default task, numbers split into digits, "
                   "with a ChatML template.")
def base_tokenizer(context: AssetExecutionContext, config: TokenizerConfig, store: ArtifactStore) -> Output[ArtifactRef]:
    def build(out, _work):
        tok = train_tokenizer(out, config.vocab_size, config.seed)
        return {"vocab_size": len(tok)}

    return cached_artifact(context, store, config=config.model_dump(), upstream={}, build=build)


class SmallTinyModelConfig(TinyModelConfig):
    """A fifth of tiny_llama's parameters: the default distillation student."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 344


def tiny_llama_asset(name: str, config_cls: type[TinyModelConfig]):
    @asset(key=key("base", name), group_name="base", code_version="1", kinds={"pytorch", "huggingface"},
           ins={"tokenizer": AssetIn(key=key("base", "tokenizer"))},
           description="A seeded, randomly initialised Llama-architecture model on the base tokenizer, in HF format.")
    def _tiny_llama(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, tokenizer: ArtifactRef) -> Output[ArtifactRef]:
        def build(out, _work):
            params = build_tiny_llama(
                tokenizer.dir, out, config.hidden_size, config.num_layers, config.num_heads,
                config.intermediate_size, config.max_position_embeddings, config.seed,
            )
            return {"parameters": params}

        return cached_artifact(context, store, config=config.model_dump(), upstream={"tokenizer": tokenizer}, build=build)

    return _tiny_llama


BASE_ASSETS = [base_tokenizer, tiny_llama_asset("tiny_llama", TinyModelConfig), tiny_llama_asset("tiny_llama_small", SmallTinyModelConfig)]
