"""`base/` assets: the tokenizer and tiny models that every embedded default chain starts from."""

from dagster import AssetExecutionContext, AssetIn, AssetKey, Config, Output, asset

from crucible_assets.base_models import build_tiny_llama, train_tokenizer
from crucible_assets.caching import cached_artifact
from resources.artifact_store import ArtifactRef, ArtifactStore


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


@asset(key=AssetKey(["base", "tokenizer"]), group_name="base", code_version="2", kinds={"huggingface"},
       description="Byte-level BPE trained on a corpus covering every default task, with a ChatML template.")
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
    @asset(key=AssetKey(["base", name]), group_name="base", code_version="1", kinds={"pytorch", "huggingface"},
           ins={"tokenizer": AssetIn(key=AssetKey(["base", "tokenizer"]))},
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
