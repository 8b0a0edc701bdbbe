"""Small reference Flax models for examples, tests and benchmarks."""

from jaxcomp.models._bert import BertConfig, BertEncoder, bert_folds, mean_pool_normalize
from jaxcomp.models._classifiers import CNN, HINTON_SIZES, MLP, NNXMLP, build_model, init_params
from jaxcomp.models._gpt import GPT, GPTConfig, gpt_folds
from jaxcomp.models._minilm import (
    MiniLM,
    bert_config_from_hf,
    bert_params_from_hf,
    load_minilm,
    minilm_dir,
)

__all__ = [
    "BertConfig",
    "BertEncoder",
    "CNN",
    "GPT",
    "GPTConfig",
    "HINTON_SIZES",
    "MLP",
    "MiniLM",
    "NNXMLP",
    "bert_config_from_hf",
    "bert_folds",
    "bert_params_from_hf",
    "build_model",
    "gpt_folds",
    "init_params",
    "load_minilm",
    "mean_pool_normalize",
    "minilm_dir",
]
