"""sl_basic's work without Dagster, the store or the checks: the same functions the assets
call (tokenizer, tiny model, records, tokenized shards, training loop, checkpoint, eval, the
eval suites it runs by default), in one plain process. The orchestration row times this
against `dagster job execute`.

    python -m bench.bare_sl_basic ROOT RUN_CONFIG.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: Path, run_config: dict) -> None:
    import pyarrow.parquet as pq

    from crucible_assets.suites.assets import SUITES
    from crucible_assets.suites.prompts import grader_for, held_out_prompts
    from crucible_assets.suites.suite import SuiteRun
    from crucible_assets.base import TinyModelConfig, TokenizerConfig, build_tiny_llama, train_tokenizer
    from crucible_assets.tokenizing import tokenize_splits
    from crucible_assets.train.algorithm import EvalRun
    from crucible_assets.train.checkpoint import save_checkpoint
    from crucible_assets.train.sft import evaluate_sft, train_sft
    from recipes.sl_basic import SlBasicDataset, SlBasicEval, SlBasicTokenize, SlBasicTrain
    from resources.backends.local.backend import LocalTorchBackend
    from resources.datasets.sources import load_records, validate_record
    from resources.datasets.splits import split_records
    from resources.store.jsonl import to_jsonl

    ops = run_config.get("ops", {})
    cfg = lambda name, cls: cls(**ops.get(name, {}).get("config", {}))  # noqa: E731
    tok_cfg, model_cfg = cfg("base__tokenizer", TokenizerConfig), cfg("base__tiny_llama", TinyModelConfig)
    data_cfg, tokenize_cfg = cfg("sl_basic__dataset", SlBasicDataset), cfg("sl_basic__tokenized", SlBasicTokenize)
    train_cfg, eval_cfg = cfg("sl_basic__checkpoint", SlBasicTrain), cfg("sl_basic__eval_report", SlBasicEval)
    dirs = {name: root / name for name in ("tokenizer", "model", "dataset", "tokenized", "work", "checkpoint")}
    for d in dirs.values():
        d.mkdir(parents=True)

    train_tokenizer(dirs["tokenizer"], tok_cfg.vocab_size, tok_cfg.seed)
    build_tiny_llama(dirs["tokenizer"], dirs["model"], model_cfg.hidden_size, model_cfg.num_layers, model_cfg.num_heads,
                     model_cfg.intermediate_size, model_cfg.max_position_embeddings, model_cfg.seed)
    train, test = split_records(load_records(data_cfg, validate_record), data_cfg.test_fraction, data_cfg.seed)
    (dirs["dataset"] / "train.jsonl").write_text(to_jsonl(train))
    (dirs["dataset"] / "test.jsonl").write_text(to_jsonl(test))
    backend = LocalTorchBackend()
    client = backend.create_training_client(dirs["model"], train_cfg.lora_rank, train_cfg.seed)
    summary = tokenize_splits(dirs["dataset"], dirs["tokenized"], client.tokenizer, "conversations", tokenize_cfg.max_length,
                              tokenize_cfg.train_on_what, tokenize_cfg.renderer)
    rows = {split: pq.read_table(dirs["tokenized"] / f"{split}.parquet").to_pylist() for split in ("train", "test")}
    pairs = {split: [(r["tokens"], r["weights"]) for r in rs] for split, rs in rows.items()}
    metrics, telemetry = train_sft(client, pairs["train"], pairs["test"], train_cfg, dirs["work"], log=lambda _: None)
    save_checkpoint(client, dirs["checkpoint"], metrics, telemetry, "train_mean_nll", "test/nll")
    start = backend.create_training_client(dirs["model"], 0, eval_cfg.seed)
    trained = backend.create_training_client(dirs["checkpoint"] / "model", 0, eval_cfg.seed)
    evaluate_sft(EvalRun(start, trained, rows["test"], eval_cfg, train_cfg, summary["stop"], {}))
    for suite in SUITES.values():
        suite_cfg = cfg(f"sl_basic__{suite.asset_stage}", suite.config)
        if suite_cfg.enabled:
            (root / suite.name).mkdir()
            suite.run(SuiteRun(trained=trained, start=start, tokenizer=trained.tokenizer,
                               prompts=held_out_prompts(dirs["dataset"], suite_cfg.num_prompts), renderer=tokenize_cfg.renderer,
                               stop=summary["stop"], grader=grader_for(train_cfg), config=suite_cfg, out=root / suite.name))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
