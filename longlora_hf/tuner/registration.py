"""Registration of LongLoRA with PEFT as peft_type "LONGLORA", and the one change it makes to PEFT's objects."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method

from .config import PEFT_TYPE, LongLoraConfig
from .model import LongLoraModel


def _add_peft_type(value: str) -> None:
    """Make `value` a member of PEFT's `PeftType` enum, as if PEFT had declared it (idempotent).

    Why: PEFT keys its registries by `PeftType`, and `register_peft_method` refuses a name that is not
    already a member ("Unknown PEFT type ..., please add an entry to peft.utils.peft_types.PeftType"),
    while a Python enum cannot be extended after its class is built. So this is the one place where the
    package changes an object of PEFT's: it fills the enum's own tables (`_member_map_`,
    `_value2member_map_`, `_member_names_`, the class attribute) the way `enum` does for a declared
    member, so `PeftType("LONGLORA")`, `PeftType.LONGLORA`, iteration, pickling and the JSON round trip
    of `adapter_config.json` all work as for PEFT's own types.

    Removed by: PEFT letting `register_peft_method` take a name that is not a member (keying its
    registries by name, or adding the member itself), i.e. an extensible `PeftType`; then
    `register_tuner` calls `register_peft_method` alone.
    """
    if value in PeftType.__members__:
        return
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    type.__setattr__(PeftType, value, member)  # EnumType.__setattr__ refuses to assign a member's name


def register_tuner() -> None:
    """Register LongLoRA with PEFT as peft_type "LONGLORA" (idempotent); `longlora_hf.register()` calls it."""
    _add_peft_type(PEFT_TYPE)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType.LONGLORA) is LongLoraConfig:
        return
    register_peft_method(name=PEFT_TYPE.lower(), config_cls=LongLoraConfig, model_cls=LongLoraModel, prefix="lora_")
