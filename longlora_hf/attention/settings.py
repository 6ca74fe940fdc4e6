"""Per-model settings of the S2-Attn backend, stored on the model config as `config.s2_attention`."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field


S2_ATTN_IMPLEMENTATION = "s2"
"""The name under which S2-Attn is registered: `attn_implementation="s2"`."""

INNER_ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")
CONFIG_ATTRIBUTE = "s2_attention"


@dataclass
class S2AttentionSettings:
    """How S2-Attn splits a training sequence into groups (paper Section 3.2, Figure 2).

    Each sequence (or each document of a packed row) of length L is split into groups of `G` tokens.
    Half of the heads attend causally within groups `[0, G), [G, 2G), ...`; the other half within the
    groups shifted by `G // 2`: `[0, G/2), [G/2, 3G/2), ...`. A sequence of at most `G` tokens has
    fewer than two groups and uses dense causal attention. Evaluation, generation and calls with a
    KV cache always use dense attention through `inner_attn_implementation`.

    The fields are the arguments, each documented by its `metadata["help"]` below. A config stores the settings as
    the dict `config.s2_attention` (`write_to`, `from_config`).

    Raises:
        `ValueError`: on construction, when a field is out of range or of the wrong type.
    """

    group_size_ratio: float = field(
        default=0.25,
        metadata={
            "help": "Group size as a fraction of each sequence's length: G = int(L * group_size_ratio). "
            "The paper's default 1/4 gives four groups. Must be in (0, 1]. Ignored when `group_size` is set."
        },
    )
    group_size: int | None = field(
        default=None,
        metadata={"help": "Absolute group size in tokens (at least 2). Overrides `group_size_ratio` when set."},
    )
    shift: bool = field(
        default=True,
        metadata={
            "help": "Shift the groups of half of the heads by half a group (S2-Attn). False gives plain short "
            "attention within groups, with no information flow between them: the paper's Table 1 ablation."
        },
    )
    inner_attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "The kernel that runs the groups in training and the dense attention in evaluation: "
            "'sdpa' (CPU and GPU) or 'flash_attention_2' (GPU, needs the `flash` extra)."
        },
    )

    def __post_init__(self):
        ratio = self.group_size_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(
                f"group_size_ratio must be a number in (0, 1]; got {ratio!r}. "
                "Use 0.25 for the paper's four groups, or set an absolute `group_size` instead."
            )
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2
        ):
            raise ValueError(
                f"group_size must be an integer of at least 2 tokens; got {self.group_size!r}. "
                "Pass group_size=None to use group_size_ratio instead."
            )
        if not isinstance(self.shift, bool):
            raise ValueError(f"shift must be True or False; got {self.shift!r}.")
        if self.inner_attn_implementation not in INNER_ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"inner_attn_implementation must be one of {INNER_ATTN_IMPLEMENTATIONS}; "
                f"got {self.inner_attn_implementation!r}."
            )

    def group_size_for(self, length: int) -> int:
        """The group size used for a sequence (or packed document) of `length` tokens.

        Args:
            length (`int`):
                The number of tokens of the sequence or packed document.

        Returns:
            `int`: `group_size` when set, else `int(length * group_size_ratio)` (may be under 2 for a short
            sequence; `s2_layout` decides what that means).
        """
        if self.group_size is not None:
            return self.group_size
        return int(length * self.group_size_ratio)

    @classmethod
    def from_config(cls, config) -> S2AttentionSettings:
        """The settings stored on `config`, or the defaults when it holds none.

        Args:
            config (`transformers.PreTrainedConfig` or `None`):
                A model config; its `s2_attention` attribute is read (a dict, as `write_to` stores it and
                `config.json` keeps it, or an instance).

        Returns:
            `S2AttentionSettings`: the stored settings (validated), or the defaults.
        """
        stored = getattr(config, CONFIG_ATTRIBUTE, None)
        if stored is None:
            return cls()
        if isinstance(stored, cls):
            return stored
        return cls(**stored)

    def write_to(self, config) -> None:
        """Store these settings on `config` as the dict `config.s2_attention`, which `save_pretrained` records.

        Args:
            config (`transformers.PreTrainedConfig`):
                The model config to write to.
        """
        setattr(config, CONFIG_ATTRIBUTE, asdict(self))


def inner_attn_implementation_for(model_attn_implementation: str | None) -> str:
    """The inner kernel S2 uses by default on a model loaded with `model_attn_implementation`: flash-attn for
    a model loaded with it, and SDPA for anything else (eager, sdpa, kernels S2 has no varlen path for).

    Args:
        model_attn_implementation (`str`, *optional*):
            The model's `config._attn_implementation`.

    Returns:
        `str`: "flash_attention_2" or "sdpa".
    """
    return "flash_attention_2" if model_attn_implementation == "flash_attention_2" else "sdpa"


def s2_field(name: str, default=MISSING, help_prefix: str = ""):
    """A dataclass field for another config (LongLoraConfig, the sft flags) that holds the S2 setting `name`,
    with this class's default and help, so the settings are written once.

    Args:
        name (`str`):
            The name of a field of `S2AttentionSettings`.
        default (*optional*):
            A default of the other config's own; by default this class's.
        help_prefix (`str`, *optional*):
            Text put before this class's help (what the other config's own default means).

    Returns:
        `dataclasses.Field`: the field, with the help in `metadata["help"]`.
    """
    source = S2AttentionSettings.__dataclass_fields__[name]
    return field(
        default=source.default if default is MISSING else default,
        metadata={**source.metadata, "help": help_prefix + source.metadata["help"]},
    )
