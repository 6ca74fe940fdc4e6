"""PEFT's own test suite, run against `LongLoraConfig`, with PEFT's plain LoRA as the control.

This suite does not come from this project. It is PEFT's test harness, `PeftCommonTester` (tests/testing_common.py),
driven through `TestDecoderModels` (tests/test_decoder_models.py), its driver for causal LMs, both taken from the
source distribution of exactly the PEFT version installed (`peft.__version__`). `support/peft_harness.py`
downloads that sdist at test time with pip, caches its tests/ folder and imports it; nothing of it is copied here.
If it cannot be fetched, every test here fails saying so.

Every `_test_*` method of the harness that test_decoder_models runs for LoRA, and those test_custom_models runs for
LoRA that apply to a causal LM, runs on three tiny models, Llama, Qwen2 and Gemma 3 (text), built by
`support.helpers.tiny_model` and saved to directories the harness loads them from as model ids. Each runs twice,
with the same kwargs:
- LoRA, the control: `LoraConfig` with PEFT's own kwargs for LoRA on decoders (test_decoder_models' plain LoraConfig
  case). A control that fails says the harness and the setup disagree, whatever LongLoRA does.
- LongLoRA: `LongLoraConfig` with the same kwargs plus `target_context_length` twice the models' context (256 ->
  512), so that position interpolation really changes RoPE (factor 2).
Where test_decoder_models makes the adapter start as something other than the identity (`set_init_weights_false`),
both get `init_lora_weights=False`.

Every case is expected to pass, except where `HarnessCase.expected_failures` says, in one line, why the harness's
check does not hold there (xfail, strict, with the exception it raises), and where PEFT's harness itself declines
a case (`HarnessCase.harness_skips`; the skip carries the harness's own reason). Any other skip by the harness fails
here: nothing is skipped silently.

The harness feeds 3-token inputs in which every query attends copies of one token id, so no RoPE change can show
(`test_only_the_long_inputs_show_the_position_interpolation`). `test_peft_harness_on_long_inputs` runs the methods
that compare a model with its base or with its saved copy (disable_adapter, unload, delete adapter, save/load,
merge) again on 32-token inputs, through the harness's own hook for inputs (`prepare_inputs_for_testing`). None of
the methods run here loads a tokenizer, so the models are saved without one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from longlora_hf import LongLoraConfig
from support.helpers import COMMON, tiny_model
from support.peft_harness import PeftHarness, PeftHarnessUnavailable, import_peft_harness


SHARED_OVERRIDES = dict(pad_token_id=0, hidden_size=64, intermediate_size=128, head_dim=16)
"""Two things the harness needs of the tiny models: its inputs are token ids 1 and 2, so the pad id (whose embedding
row is zero, zeroing every logit) must be another; its weighted-adapter case adds a rank-20 adapter, so every
projection must be at least 20 wide (key/value: 2 heads of 16), or PEFT's SVD truncates it to a shape that breaks."""


@dataclass(frozen=True)
class TinyModel:
    """A tiny model of `support.helpers.ARCHITECTURES[arch]`, saved for the harness as `<directory>` (named like PEFT's
    own tiny checkpoints, so the harness's adjustments keyed to their ids, such as `"qwen2" in model_id` for its
    dummy Qwen2's near-zero weights, do not apply to it)."""

    arch: str
    directory: str
    overrides: dict = field(default_factory=dict)

    def build(self) -> transformers.PreTrainedModel:
        return tiny_model(self.arch, **SHARED_OVERRIDES, **self.overrides)


TINY_MODELS = {
    "llama": TinyModel("llama", "tiny-LlamaForCausalLM"),
    "qwen2": TinyModel("qwen2", "tiny-Qwen2ForCausalLM"),
    # One sliding-window layer and one global layer, as Gemma 3 interleaves them; position interpolation extends
    # the global layer's RoPE only, so a model of sliding layers alone would not change.
    "gemma3": TinyModel("gemma3", "tiny-Gemma3ForCausalLM", {"layer_types": ["sliding_attention", "full_attention"]}),
}
MODELS = tuple(TINY_MODELS)
TARGET_CONTEXT_LENGTH = 2 * COMMON["max_position_embeddings"]
LONG_INPUT_LENGTH = 32
PLAIN_LORA_KEYS = {"task_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias"}


@dataclass(frozen=True)
class Tuner:
    """The config class a case runs with, and what it adds to PEFT's LoRA kwargs."""

    name: str
    config_cls: type
    extra_kwargs: dict = field(default_factory=dict)


LORA = Tuner("LoRA", LoraConfig)
LONGLORA = Tuner("LongLoRA", LongLoraConfig, {"target_context_length": TARGET_CONTEXT_LENGTH})
TUNERS = (LORA, LONGLORA)


@dataclass(frozen=True)
class Where:
    """A set of (model, tuner) pairs: None matches every model, or every tuner."""

    tuner: Tuner | None = None
    model: str | None = None

    def matches(self, model: str, tuner: Tuner) -> bool:
        return self.tuner in (None, tuner) and self.model in (None, model)


@dataclass(frozen=True)
class ExpectedFailure:
    """A harness check that does not hold there by design, and the exception it fails with."""

    where: Where
    reason: str
    raises: type[BaseException] = AssertionError


@dataclass(frozen=True)
class HarnessSkip:
    """A case PEFT's harness itself does not run there (it calls pytest.skip)."""

    where: Where
    reason: str


@dataclass(frozen=True)
class HarnessCase:
    """One `PeftCommonTester._test_<method>` call, as test_decoder_models (or test_custom_models) makes it for LoRA."""

    method: str
    arguments: dict = field(default_factory=dict)
    """Further keyword arguments of the method (dtype, safe_serialization...)."""
    non_identity_init: bool = False
    """PEFT's driver passes `set_init_weights_false(...)`: the adapter must change the outputs."""
    name: str = ""
    expected_failures: tuple[ExpectedFailure, ...] = ()
    harness_skips: tuple[HarnessSkip, ...] = ()

    @property
    def id(self) -> str:
        return self.name or self.method

    def expected_failure(self, model: str, tuner: Tuner) -> ExpectedFailure | None:
        return next((failure for failure in self.expected_failures if failure.where.matches(model, tuner)), None)

    def harness_skip(self, model: str, tuner: Tuner) -> HarnessSkip | None:
        return next((skip for skip in self.harness_skips if skip.where.matches(model, tuner)), None)


LORA_PLUS_GRADIENTS = ExpectedFailure(
    Where(LONGLORA), "asserts only LoRA weights get gradients; LoRA+ also trains the embedding and the norms"
)
LOCAL_BASE_IN_CARD = ExpectedFailure(
    Where(LONGLORA),
    "asserts the card's base_model is the base's local path; LongLoRA's card puts only Hub ids there",
    KeyError,
)
TIED_EMBEDDINGS_SAVE = ExpectedFailure(
    Where(model="gemma3"),
    "the harness saves state_dict() with safetensors' save_file, which refuses Gemma 3's tied embeddings",
    RuntimeError,
)
EXACT_LORA_CLASS = HarnessSkip(Where(LONGLORA), "the harness runs it for config_cls == LoraConfig, not subclasses")

HARNESS_CASES = (
    HarnessCase("model_attr"),
    HarnessCase("adapter_name"),
    HarnessCase("add_adapter_no_autocast_adapter_dtype", {"dtype": torch.float16}, name="add_adapter_dtype_fp16"),
    HarnessCase("add_adapter_no_autocast_adapter_dtype", {"dtype": torch.bfloat16}, name="add_adapter_dtype_bf16"),
    HarnessCase(
        "prepare_for_training",
        expected_failures=(
            ExpectedFailure(
                Where(LONGLORA), "asserts the input embedding's output needs no grad; LoRA+ trains the input embedding"
            ),
        ),
    ),
    HarnessCase("save_pretrained", non_identity_init=True, expected_failures=(LOCAL_BASE_IN_CARD,)),
    HarnessCase(
        "save_pretrained",
        {"safe_serialization": False},
        True,
        name="save_pretrained_pickle",
        expected_failures=(LOCAL_BASE_IN_CARD,),
    ),
    HarnessCase("save_pretrained_selected_adapters", non_identity_init=True, expected_failures=(LOCAL_BASE_IN_CARD,)),
    HarnessCase(
        "save_pretrained_selected_adapters",
        {"safe_serialization": False},
        True,
        name="save_pretrained_selected_adapters_pickle",
        expected_failures=(LOCAL_BASE_IN_CARD,),
    ),
    HarnessCase("save_pretrained_adapter_name_substring", non_identity_init=True),
    HarnessCase("from_pretrained_config_construction"),
    HarnessCase("load_model_low_cpu_mem_usage"),
    HarnessCase("load_multiple_adapters"),
    HarnessCase("merge_layers", non_identity_init=True),
    HarnessCase("merge_layers_multi", non_identity_init=True),
    HarnessCase("merge_layers_nan", non_identity_init=True),
    HarnessCase("merge_layers_fp16"),
    HarnessCase("merge_layers_is_idempotent", non_identity_init=True),
    HarnessCase("safe_merge", non_identity_init=True, expected_failures=(TIED_EMBEDDINGS_SAVE,)),
    HarnessCase(
        "mixed_adapter_batches",
        non_identity_init=True,
        harness_skips=(
            HarnessSkip(Where(LONGLORA), "the harness runs it for config_cls in (LoraConfig, RoadConfig)"),
        ),
    ),
    HarnessCase(
        "generate_with_mixed_adapter_batches_and_beam_search",
        non_identity_init=True,
        harness_skips=(EXACT_LORA_CLASS,),
    ),
    HarnessCase("generate"),
    HarnessCase("generate_pos_args", {"raises_err": False}),
    HarnessCase("generate_half_prec"),
    HarnessCase("training"),
    HarnessCase("training_layer_indexing", expected_failures=(LORA_PLUS_GRADIENTS,)),
    HarnessCase(
        "training_gradient_checkpointing",
        {"use_reentrant": True},
        name="training_gradient_checkpointing_reentrant",
        expected_failures=(LORA_PLUS_GRADIENTS,),
    ),
    HarnessCase(
        "training_gradient_checkpointing",
        {"use_reentrant": False},
        name="training_gradient_checkpointing_non_reentrant",
        expected_failures=(LORA_PLUS_GRADIENTS,),
    ),
    HarnessCase("inference_safetensors"),
    HarnessCase("peft_model_device_map"),
    HarnessCase("delete_adapter"),
    HarnessCase("delete_inactive_adapter"),
    HarnessCase("delete_unknown_adapter_raises"),
    HarnessCase("adding_multiple_adapters_with_bias_raises"),
    HarnessCase("unload_adapter", non_identity_init=True),
    HarnessCase(
        "weighted_combination_of_adapters",
        non_identity_init=True,
        expected_failures=(
            ExpectedFailure(
                Where(LONGLORA),
                "LongLoRA refuses add_weighted_adapter: PEFT cannot weigh its LoRA+ modules (embedding, norms)",
                ValueError,
            ),
        ),
        harness_skips=(HarnessSkip(Where(model="gemma3"), "the harness skips Gemma model ids (SVD fails on Gemma)"),),
    ),
    HarnessCase("disable_adapter", non_identity_init=True),
    HarnessCase("passing_input_embeds_works", {"test_name": ""}),
    HarnessCase("lora_conversion", non_identity_init=True),
    HarnessCase("get_base_model_state_dict"),
)

LONG_INPUT_METHODS = (
    "disable_adapter",
    "unload_adapter",
    "delete_adapter",
    "delete_inactive_adapter",
    "inference_safetensors",
    "merge_layers",
)
"""The methods that compare a model's outputs with its base's or its saved copy's, or run the base once the
adapters are gone: a RoPE or an attention left behind by LongLoRA shows there. Not safe_merge: its tolerance
(1e-6) is below the float32 rounding of merging LongLoRA's four projections over 32 tokens (about 1e-6, with or
without position interpolation); merge_layers checks the same merge at 1e-4."""
LONG_INPUT_CASES = tuple(case for case in HARNESS_CASES if case.method in LONG_INPUT_METHODS)


def harness_params(cases: tuple[HarnessCase, ...]) -> list:
    params = []
    for model in MODELS:
        for case in cases:
            for tuner in TUNERS:
                failure = case.expected_failure(model, tuner)
                marks = []
                if failure:
                    marks.append(pytest.mark.xfail(strict=True, raises=failure.raises, reason=failure.reason))
                params.append(pytest.param(model, case, tuner, id=f"{model}-{case.id}-{tuner.name}", marks=marks))
    return params


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this module runs: on models this small, threads cost more than they give (about
    half the module's time on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def harness() -> PeftHarness:
    """PEFT's test harness for the installed version (downloaded once, then cached); a failure to fetch it fails."""
    try:
        return import_peft_harness()
    except PeftHarnessUnavailable as error:
        unavailable = str(error)
    pytest.fail(f"PEFT's test harness is unavailable, so none of its checks ran: {unavailable}", pytrace=False)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, harness) -> dict[str, str]:
    """Each tiny model saved in a directory of its own, which the harness loads it from as its model id."""
    root = tmp_path_factory.mktemp("peft-harness-models")
    dirs = {}
    for name, model in TINY_MODELS.items():
        directory = root / model.directory
        model.build().save_pretrained(directory)
        dirs[name] = str(directory)
    harness.mark_models_cached(*dirs.values())
    return dirs


@pytest.fixture(scope="session")
def lora_kwargs(harness) -> dict:
    """PEFT's own kwargs for LoRA on decoders: test_decoder_models' first plain LoraConfig case."""
    for config_cls, kwargs in harness.decoder.ALL_CONFIGS:
        if config_cls is LoraConfig and set(kwargs) <= PLAIN_LORA_KEYS:
            return dict(kwargs)
    pytest.fail(f"PEFT {harness.version}'s test_decoder_models.ALL_CONFIGS has no plain LoraConfig case")


def decoder_tester(harness: PeftHarness, input_length: int | None = None):
    """An instance of PEFT's TestDecoderModels, whose `prepare_inputs_for_testing` gives `input_length` tokens
    (None: the harness's own inputs)."""
    namespace = {"__test__": False}
    if input_length is not None:
        namespace["prepare_inputs_for_testing"] = lambda self: long_inputs(input_length, self.torch_device)
    return type("LongLoraDecoderTester", (harness.decoder.TestDecoderModels,), namespace)()


def long_inputs(length: int, device="cpu") -> dict[str, torch.Tensor]:
    """Two sequences of `length` tokens, the second left-padded by 4 (a batch as generate sees one)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, COMMON["vocab_size"], (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :4], attention_mask[1, :4] = SHARED_OVERRIDES["pad_token_id"], 0
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def run_harness_case(tester, case: HarnessCase, model: str, tuner: Tuner, model_dirs, lora_kwargs) -> None:
    """Call the harness's `_test_<method>` on `model` with `tuner`. A skip by the harness fails, unless `case`
    expects it there."""
    method = getattr(tester, f"_test_{case.method}", None)
    if method is None:
        pytest.fail(f"PEFT's harness has no _test_{case.method} in this version", pytrace=False)
    config_kwargs = {**lora_kwargs, **tuner.extra_kwargs}
    if case.non_identity_init:
        config_kwargs["init_lora_weights"] = False
    torch.manual_seed(0)
    try:
        method(model_id=model_dirs[model], config_cls=tuner.config_cls, config_kwargs=config_kwargs, **case.arguments)
    except pytest.skip.Exception as skip:
        expected = case.harness_skip(model, tuner)
        if expected is None:
            pytest.fail(f"PEFT's harness skipped a case it should run: {skip.msg}", pytrace=False)
        pytest.skip(f"not run by PEFT's harness ({expected.reason}): {skip.msg}")


@pytest.mark.parametrize("model,case,tuner", harness_params(HARNESS_CASES))
def test_peft_harness(harness, model_dirs, lora_kwargs, model, case, tuner):
    run_harness_case(decoder_tester(harness), case, model, tuner, model_dirs, lora_kwargs)


@pytest.mark.parametrize("model,case,tuner", harness_params(LONG_INPUT_CASES))
def test_peft_harness_on_long_inputs(harness, model_dirs, lora_kwargs, model, case, tuner):
    run_harness_case(decoder_tester(harness, LONG_INPUT_LENGTH), case, model, tuner, model_dirs, lora_kwargs)


def test_long_inputs_replace_the_harness_inputs(harness):
    short = decoder_tester(harness).prepare_inputs_for_testing()["input_ids"]
    long = decoder_tester(harness, LONG_INPUT_LENGTH).prepare_inputs_for_testing()["input_ids"]
    assert short.shape[1] < 8 and long.shape == (2, LONG_INPUT_LENGTH)


@pytest.mark.parametrize("model", MODELS)
def test_only_the_long_inputs_show_the_position_interpolation(harness, model_dirs, model):
    """With its adapter still the identity, the LongLoRA model differs from its base only by the position
    interpolation. The harness's inputs cannot show it: each query attends one token id only (masked ones aside),
    whose values are the same whatever the attention weights. The long inputs show it, beyond the harness's
    tolerances, so a base whose RoPE is not given back fails the long-input cases."""
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[model])
    harness_inputs = decoder_tester(harness).prepare_inputs_for_testing()
    inputs = long_inputs(LONG_INPUT_LENGTH)
    with torch.no_grad():
        base_logits = base(**harness_inputs).logits, base(**inputs).logits
        config = LongLoraConfig(target_context_length=TARGET_CONTEXT_LENGTH)
        extended = get_peft_model(base, config).eval()
        extended_logits = extended(**harness_inputs).logits, extended(**inputs).logits
    assert config.position_interpolation_factor == 2.0
    assert config.rope_parameters != config.original_rope_parameters
    assert torch.allclose(base_logits[0], extended_logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base_logits[1], extended_logits[1], atol=1e-4, rtol=1e-4)
