"""The benchmark matrix: models x schemes x methods, evaluated by one evaluator. Typed like the recipe."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

_SCHEME = re.compile(r"^w(?P<bits>[2-8])a16-(?P<symmetry>sym|asym)-(?P<group>g(?P<size>\d+)|channel)$")
PEERS = ("llmcompressor", "autoround", "hqq")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def scheme_overrides(name: str) -> dict:
    """Recipe overrides of a scheme name such as ``w3a16-asym-g64`` or ``w4a16-sym-channel``."""
    match = _SCHEME.match(name)
    if match is None:
        raise ValueError(f"scheme {name!r} not understood; use w<bits>a16-<sym|asym>-<g<size>|channel>")
    size = match.group("size")
    return {"weights.bits": int(match.group("bits")), "weights.symmetric": match.group("symmetry") == "sym",
            "weights.group_size": int(size) if size else -1}


def nominal_bits_per_weight(name: str, scale_bits: int = 16) -> float:
    """Bits per weight of a scheme counting codes, one scale per group and (affine) one zero point per group."""
    overrides = scheme_overrides(name)
    group = overrides["weights.group_size"]
    if group == -1:
        return float(overrides["weights.bits"])
    extra = scale_bits + (0 if overrides["weights.symmetric"] else overrides["weights.bits"])
    return overrides["weights.bits"] + extra / group


class ModelEntry(_Strict):
    name: str
    source: str = Field(description="built-in name, HF folder or .gguf")


class MethodEntry(_Strict):
    """A lowbit recipe (``recipe`` overrides, dotted keys) or a peer tool run through its driver."""

    name: str
    recipe: dict = Field(default_factory=dict)
    recipe_file: str | None = None
    peer: Literal["llmcompressor", "autoround", "hqq"] | None = None
    peer_method: str | None = None
    peer_args: dict[str, int | float | str] = Field(
        default_factory=dict, description="extra driver options, passed as --key value (e.g. AutoRound's iters)"
    )

    @property
    def is_peer(self) -> bool:
        return self.peer is not None


class CalibrationEntry(_Strict):
    source: str
    num_samples: int = 128
    seqlen: int = 512
    seed: int = 0


class PerplexityEntry(_Strict):
    file: str
    seqlen: int = 512
    max_windows: int | None = 64


class ZeroShotEntry(_Strict):
    tasks: list[str] = ["piqa", "arc_easy", "arc_challenge", "winogrande", "lambada_openai"]
    task_dir: str
    limit: int | None = 500
    batch_size: int = 16


class BenchConfig(_Strict):
    version: Literal[1] = 1
    output: str = "bench/results/matrix"
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where every tool quantizes and lowbit evaluates; auto = cuda when torch sees a GPU")
    models: list[ModelEntry]
    schemes: list[str]
    methods: list[MethodEntry]
    calibration: CalibrationEntry
    perplexity: PerplexityEntry
    zeroshot: ZeroShotEntry | None = None
    kl_divergence: bool = True
    heatmap: str | None = Field(None, description="cell key 'model | scheme | method' for the per-layer heat map")
    peer_timeout_seconds: int = 4 * 3600

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        for scheme in self.schemes:
            scheme_overrides(scheme)
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError("method names must be unique")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, object] | None = None) -> BenchConfig:
        """Load ``path``; its relative data paths are resolved against its folder, then ``overrides`` apply
        (see ``updated``; paths given there stay relative to the current directory)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bench config {path} does not exist")
        config = cls.model_validate(yaml.safe_load(path.read_text()) or {})
        return config.relative_to(path.parent).updated(overrides or {})

    def updated(self, overrides: dict[str, object]) -> BenchConfig:
        """A copy with dotted-path overrides, e.g. ``{"perplexity.file": "data/test.txt", "device": "cuda"}``.

        A list (``models``, ``methods``) is indexed by an entry's ``name`` or by its position:
        ``models.smollm2-135m.source`` or ``models.0.source``.
        """
        data = self.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = _child(node, key, dotted)
            if isinstance(node, list) or leaf not in node:
                raise ValueError(f"unknown bench config field {dotted!r}")
            node[leaf] = value
        return BenchConfig.model_validate(data)

    def restricted(self, schemes: list[str] | None = None, methods: list[str] | None = None) -> BenchConfig:
        """The same matrix limited to some schemes and/or methods (by name, in the config's order)."""
        data = self.model_dump()
        if schemes is not None:
            _check_names("scheme", schemes, self.schemes)
            data["schemes"] = [s for s in self.schemes if s in schemes]
        if methods is not None:
            _check_names("method", methods, [m.name for m in self.methods])
            data["methods"] = [m for m in data["methods"] if m["name"] in methods]
        return BenchConfig.model_validate(data)

    def relative_to(self, base: Path) -> BenchConfig:
        """Resolve relative data paths against the config file's folder (the output stays cwd-relative)."""

        def fix(value: str) -> str:
            candidate = base / value
            return str(candidate) if not Path(value).is_absolute() and candidate.exists() else value

        data = self.model_dump()
        data["calibration"]["source"] = fix(data["calibration"]["source"])
        data["perplexity"]["file"] = fix(data["perplexity"]["file"])
        if data["zeroshot"]:
            data["zeroshot"]["task_dir"] = fix(data["zeroshot"]["task_dir"])
        for method in data["methods"]:
            if method["recipe_file"]:
                method["recipe_file"] = fix(method["recipe_file"])
        for model in data["models"]:
            model["source"] = fix(model["source"])
        return BenchConfig.model_validate(data)


def _child(node: dict | list, key: str, dotted: str) -> dict | list:
    if isinstance(node, list):
        named = [entry for entry in node if isinstance(entry, dict) and entry.get("name") == key]
        if named:
            return named[0]
        if key.isdigit() and int(key) < len(node):
            return node[int(key)]
        names = ", ".join(str(entry.get("name")) for entry in node if isinstance(entry, dict))
        raise ValueError(f"{dotted!r}: no entry named {key!r} (entries: {names})")
    if not isinstance(node.get(key), (dict, list)):
        raise ValueError(f"unknown bench config field {dotted!r}")
    return node[key]


def _check_names(kind: str, chosen: list[str], available: list[str]) -> None:
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"{kind} {', '.join(unknown)} not in the config; choose from {', '.join(available)}")
