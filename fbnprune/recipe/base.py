"""What every recipe section shares: unknown keys and booleans-for-numbers are errors."""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

from fbnprune.errors import FbnpruneError

RECIPE_VERSION: Final = 1
MAX_SEED: Final = 2**32 - 1  # numpy's and scikit-learn's random states take no larger

Site = Literal["hidden", "output"]
Fill = Literal["zero", "mean", "reconstruct"]
Layout = Literal["padded", "compact"]
Allocation = Literal["global", "uniform", "sensitivity"]
Selector = Literal["ica", "magnitude", "random", "wanda"]
Scoring = Literal["sum", "mean", "byte", "calibrated", "first_token"]  # evaluate.answers


class RecipeError(FbnpruneError, ValueError):
    """A recipe that cannot be read or does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: object) -> object:
        """YAML reads ``true``/``yes``/``on`` as booleans, which pydantic would take as 1:
        ``budget: true`` must not mean 100%."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if isinstance(value, bool) and field and not _takes_bool(field.annotation):
                    raise ValueError(f"{name}: expected a number or text, got the boolean {value}")
        return data


class _Additions(_Strict):
    """A section whose ``added`` fields came after its stage key was defined: they are left
    out of dumps (stage keys, fingerprints, the run's recipe.yaml) while at their defaults, so
    earlier recipes keep their keys and their runs are reused."""

    added: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_default_additions(self, handler: Any) -> Any:
        data = handler(self)
        fields = type(self).model_fields
        for name in self.added:
            if isinstance(data, dict) and getattr(self, name) == fields[name].default:
                data.pop(name, None)
        return data


def _takes_bool(annotation: object) -> bool:
    """Whether a field's type admits ``bool`` (``bool``, ``bool | None``, ...)."""
    return annotation is bool or any(_takes_bool(arg) for arg in get_args(annotation))
