"""Convert IP-Adapter / FaceID training checkpoints into the published adapter layout.

    python -m lib_instantid.convert IN [OUT] [--template NAME|FILE] [--format bin|safetensors]
                                    [--force] [--json]

IN is what the official training scripts save: an accelerate checkpoint folder
(``checkpoint-N/`` with ``model.safetensors`` or ``pytorch_model.bin``, sharded or not) or one such
file, with or without the UNet weights; an already converted adapter is validated and re-saved.
The result is checked against a template (a built-in manifest picked from the weights, a manifest
named with --template, or a real published file given as --template FILE) and written only when it
matches; --force writes it anyway, with ``OUT.report.json`` beside it. Without OUT nothing is
written (a check only).

Tensors whose dtype differs from the template's are cast to it (training saves float32, the
published files are float16): the output then loads and weighs like the published file. The
report says how many were cast; a cast never fails validation.

Exit codes: 0 written (or a passing check without OUT), 1 refused, 2 usage error.
``convert`` returns a ``Report`` (``text()`` to print, ``to_dict()`` for JSON); the mapping and
validation rules are in ``convert_rules``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from . import convert_rules as rules
from .errors import InputError, InstantIDError, ModelFileError
from .model_files import classify
from .weights import PICKLE_EXTS, SAFE_EXTS, TensorInfo, flatten, load_file, load_pickle_mapped, unreadable_error

FORMATS = {".safetensors": "safetensors", ".bin": "bin", ".pt": "bin", ".pth": "bin"}
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")
_WRAPPER_KEYS = ("state_dict", "model", "module")
_LIST_LIMIT = 25


@dataclass
class Report:
    input: str
    input_files: List[str] = field(default_factory=list)
    layout: List[str] = field(default_factory=list)
    prefixes_removed: List[str] = field(default_factory=list)
    variant: str = ""
    base: str = ""
    tokens: int = 0
    template: str = ""
    template_source: str = ""
    format: str = ""
    counts: Dict[str, int] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    missing_layers: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatches: List[Tuple[str, List[int], List[int]]] = field(default_factory=list)
    dtype_mismatches: List[Tuple[str, str, str]] = field(default_factory=list)
    cast: Dict[str, int] = field(default_factory=dict)        # "float32 -> float16": count
    ignored: Dict[str, int] = field(default_factory=dict)     # key group -> count
    unknown: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    ok: bool = False
    forced: bool = False
    written: Optional[str] = None
    report_file: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape_mismatches"] = [{"key": k, "got": g, "expected": e} for k, g, e in self.shape_mismatches]
        d["dtype_mismatches"] = [{"key": k, "got": g, "expected": e} for k, g, e in self.dtype_mismatches]
        return d

    def text(self) -> str:
        lines = [f"Input: {self.input}"]
        if self.input_files and self.input_files != [self.input]:
            lines.append(f"  read: {', '.join(self.input_files)}")
        for item in self.layout:
            lines.append(f"Layout: {item}")
        if self.prefixes_removed:
            lines.append(f"  prefix removed: {', '.join(self.prefixes_removed)}")
        if self.variant or self.base:
            tokens = f", {self.tokens} tokens" if self.tokens else ""
            lines.append(f"Detected: {self.variant or 'unknown variant'} · {rules.base_label(self.base)}{tokens}")
        if self.template:
            lines.append(f"Template: {self.template} ({self.template_source})")
        c = self.counts
        if c:
            lines.append(f"Tensors: {c.get('image_proj', 0)} image_proj, {c.get('ip_adapter', 0)} ip_adapter "
                         f"({c.get('lora', 0)} LoRA) from {c.get('input_keys', 0)} input keys; "
                         f"template {c.get('template_keys', 0)}")
        if self.ignored:
            total = sum(self.ignored.values())
            groups = ", ".join(f"{k} ({v})" for k, v in list(self.ignored.items())[:8])
            more = f", {len(self.ignored) - 8} more groups" if len(self.ignored) > 8 else ""
            lines.append(f"Ignored: {total} keys that are not part of the adapter: {groups}{more}")
        if self.cast:
            lines.append("Cast to the template's dtype: " + ", ".join(f"{k} ({v})" for k, v in self.cast.items()))
        _section(lines, "Missing layers", self.missing_layers)
        _section(lines, "Missing keys", self.missing)
        _section(lines, "Unexpected keys", self.unexpected)
        _section(lines, "Shape mismatches",
                 [f"{k}: got {g}, template {e}" for k, g, e in self.shape_mismatches])
        _section(lines, "Unknown keys (neither image projection nor adapter layers)", self.unknown)
        _section(lines, "Problems", self.problems)
        _section(lines, "Notes", self.notes)
        if self.written:
            state = "OK" if self.ok else "NOT VALID, written because of --force"
            lines.append(f"Result: {state}; written to {self.written}")
            if self.report_file:
                lines.append(f"  report: {self.report_file}")
        elif self.ok:
            lines.append("Result: OK (check only; give an output file to write it)")
        else:
            lines.append("Result: REFUSED; nothing written (fix the problems above, or use --force)")
        return "\n".join(lines)


def _section(lines: List[str], title: str, items: List[str]) -> None:
    if not items:
        return
    lines.append(f"{title} ({len(items)}):")
    lines.extend(f"  {item}" for item in items[:_LIST_LIMIT])
    if len(items) > _LIST_LIMIT:
        lines.append(f"  ... and {len(items) - _LIST_LIMIT} more (see --json)")


# ----------------------------------------------------------------------------------------------
# Reading the input
# ----------------------------------------------------------------------------------------------


def checkpoint_files(path: str) -> List[str]:
    """The weight file(s) to read: the file itself, or those of an accelerate checkpoint folder."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"Input not found: '{path}'. Give a training checkpoint folder or a weights file.")
    for name in CHECKPOINT_FILES:
        candidate = os.path.join(path, name)
        if not os.path.isfile(candidate):
            continue
        if not name.endswith(".index.json"):
            return [candidate]
        with open(candidate, encoding="utf-8") as f:
            try:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, AttributeError):
                raise ModelFileError(f"'{candidate}' is not a shard index (no weight_map).") from None
        if any(os.path.basename(s) != s for s in shards):
            raise ModelFileError(f"'{candidate}' names shards outside its folder; refusing to read them.")
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ModelFileError(f"The checkpoint '{path}' is incomplete: shard '{missing[0]}' is missing.")
        return [os.path.join(path, s) for s in shards]
    raise InputError(f"'{path}' holds no model.safetensors or pytorch_model.bin: it is not an accelerate "
                     "checkpoint folder. Point at the checkpoint-N folder or at the weights file.")


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Every key; the tensors of keys the conversion ignores (the UNet) are not read."""
    from safetensors import safe_open
    out: Dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                skip = rules.key_kind(key) in ("ignored", "unknown")
                out[key] = torch.empty(0, device="meta") if skip else f.get_tensor(key)
    except Exception as exc:   # safetensors raises its own error types
        raise unreadable_error(path, exc) from None
    return out


def _read_pickle(path: str) -> Dict[str, torch.Tensor]:
    data = load_pickle_mapped(path)   # memory-mapped: the UNet weights are not read
    if data is None:
        data = load_file(path)
    if not isinstance(data, Mapping):
        raise ModelFileError(f"'{os.path.basename(path)}' does not hold a dictionary of tensors.")
    wrapper = next((k for k in _WRAPPER_KEYS if isinstance(data.get(k), Mapping)), None)
    if wrapper and not any(rules.key_kind(str(k) + ".x") != "unknown" for k in data):
        data = data[wrapper]   # {"state_dict": {...}, "epoch": ...} style checkpoints
    return flatten(data)


def read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(flat state dict, files read) of a checkpoint folder or file; only safe loaders are used."""
    files = checkpoint_files(path)
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        lower = f.lower()
        if lower.endswith(SAFE_EXTS):
            state.update(_read_safetensors(f))
        elif lower.endswith(PICKLE_EXTS):
            state.update(_read_pickle(f))
        else:
            raise InputError(f"'{os.path.basename(f)}' is not a .safetensors, .bin, .pt or .pth file.")
    return state, files


# ----------------------------------------------------------------------------------------------
# Converting
# ----------------------------------------------------------------------------------------------


def output_format(output_path: Optional[str], fmt: Optional[str]) -> str:
    if fmt and fmt not in ("bin", "safetensors"):
        raise InputError(f"--format must be 'bin' or 'safetensors', not '{fmt}'.")
    if not output_path:
        return fmt or "bin"
    ext = os.path.splitext(output_path)[1].lower()
    by_ext = FORMATS.get(ext)
    if by_ext is None:
        raise InputError(f"The output '{os.path.basename(output_path)}' must end in .safetensors or .bin "
                         "(loaders pick the reader from the extension).")
    if fmt and fmt != by_ext:
        raise InputError(f"--format {fmt} does not match the output name '{os.path.basename(output_path)}'; "
                         f"name it *.{'safetensors' if fmt == 'safetensors' else 'bin'}.")
    return by_ext


def _infos(tensors: Mapping[str, torch.Tensor]) -> Dict[str, TensorInfo]:
    return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}


def convert_state_dict(state: Mapping[str, torch.Tensor], template=None, fmt: str = "bin", name: str = "",
                       input_label: str = "") -> Tuple[Report, Dict[str, torch.Tensor]]:
    """Map, validate and cast a flat state dict (works on meta tensors); nothing is written.

    ``template``: None (pick a built-in manifest), a manifest name, a file path, or a
    ``convert_rules.Template``. ``name`` is the file name used to settle what the weights cannot
    tell (plus vs plus-face, FaceID-Plus v1 vs v2). Returns the report and the converted flat
    tensors in the published order, cast to the template's dtypes.
    """
    report = Report(input=input_label or name, format=fmt)
    mapped = rules.map_keys(state)
    report.layout, report.prefixes_removed = mapped.layouts, mapped.prefixes
    report.ignored, report.unknown = mapped.ignored, mapped.unknown
    report.problems.extend(mapped.problems)
    tensors = mapped.tensors
    infos = _infos(tensors)
    if not tensors:
        report.problems.append("No adapter weights found: a training checkpoint has image_proj_model.* and "
                               "adapter_modules.* (or unet.*.processor.to_k_ip.*) keys, a converted one "
                               "image_proj.* and ip_adapter.* keys.")
    detected = classify(infos, name) if tensors else None
    if detected is not None and detected.role == "adapter":
        report.variant, report.tokens = detected.variant, detected.tokens
    elif detected is not None:
        report.notes.append(f"The weights were not recognised as an adapter ({detected.detail or detected.role}).")
    bases = rules.context_bases(infos)
    report.base = bases[0] if len(bases) == 1 else ""   # several: a mix, named in the problems
    if not report.base:
        report.tokens = 0   # counted against one context width: meaningless in a mix
    report.problems.extend(rules.structural_problems(infos))

    chosen = template if isinstance(template, rules.Template) else rules.resolve_template(template, fmt)
    if chosen is None:
        chosen = rules.pick_template(infos, report.variant, report.base, fmt)
        if chosen is None and tensors:
            report.problems.append(f"No built-in template for a {report.variant or 'this'} adapter on "
                                   f"{rules.base_label(report.base)}; pass --template with a published file "
                                   "of the same kind, or use --force.")
    if chosen is not None:
        report.template, report.template_source = chosen.name, chosen.source
        if chosen.source == "built-in manifest" and chosen.container == "torch-pickle-nested" and fmt == "safetensors":
            report.notes.append(f"No .safetensors version of {chosen.name} is published: the output holds the "
                                "same tensors with flat keys.")
        cmp = rules.compare(infos, chosen)
        report.missing, report.unexpected = cmp.missing, cmp.unexpected
        report.shape_mismatches, report.dtype_mismatches = cmp.shape_mismatches, cmp.dtype_mismatches
        report.missing_layers = cmp.missing_layers
        tensors = _cast(tensors, chosen, report)

    reference = chosen if chosen is not None and chosen.ordered else \
        rules.pick_template(infos, report.variant, report.base, fmt)
    tensors = {k: tensors[k] for k in rules.order_keys(tensors, reference)}
    ip_keys = [k for k in tensors if k.startswith("ip_adapter.")]
    report.counts = {"input_keys": len(state), "image_proj": len(tensors) - len(ip_keys),
                     "ip_adapter": len(ip_keys), "lora": sum("_lora." in k for k in ip_keys),
                     "rebuilt_from_unet": mapped.rebuilt, "ignored": sum(mapped.ignored.values()),
                     "unknown": len(mapped.unknown), "template_keys": len(chosen.specs) if chosen else 0}
    report.ok = bool(tensors) and chosen is not None and not (
        report.missing or report.unexpected or report.shape_mismatches or report.unknown or report.problems)
    return report, tensors


def _cast(tensors: Dict[str, torch.Tensor], template: rules.Template, report: Report) -> Dict[str, torch.Tensor]:
    casts: Counter = Counter()
    out = {}
    for key, t in tensors.items():
        spec = template.specs.get(key)
        if spec is not None and spec[1] != t.dtype and t.dtype.is_floating_point and spec[1].is_floating_point:
            casts[f"{rules.dtype_name(t.dtype)} -> {rules.dtype_name(spec[1])}"] += 1
            t = t.to(spec[1])
        out[key] = t
    report.cast = dict(casts)
    return out


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns exactly its bytes (torch.save writes whole storages)."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_adapter(tensors: Mapping[str, torch.Tensor], path: str, fmt: str) -> None:
    """The published layout: nested {"image_proj", "ip_adapter"} .bin, or flat .safetensors."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file({k: _own_storage(v) for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        else:
            nested: Dict[str, Dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            for key, value in tensors.items():
                outer, inner = key.split(".", 1)
                nested[outer][inner] = _own_storage(value)
            torch.save(nested, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def convert(input_path: str, output_path: Optional[str] = None, template: Optional[str] = None,
            fmt: Optional[str] = None, force: bool = False) -> Report:
    """Convert a training checkpoint (folder or file); write ``output_path`` only if it validates.

    ``template``: a built-in manifest name or a file (see module doc). ``fmt``: "bin" or
    "safetensors", default from the output extension. ``force`` writes an invalid result together
    with ``<output_path>.report.json``. Raises InputError for bad arguments, ModelFileError for
    unreadable files; everything the weights get wrong is in the report.
    """
    fmt = output_format(output_path, fmt)
    if output_path and os.path.isdir(output_path):
        raise InputError(f"The output '{output_path}' is a folder; give a file name ending in .bin or .safetensors.")
    files = checkpoint_files(input_path)
    if output_path and any(_same_file(output_path, f) for f in files):
        raise InputError(f"The output '{output_path}' is the input file; choose another name (the input is "
                         "never overwritten).")
    chosen = rules.resolve_template(template, fmt)
    state, files = read_checkpoint(input_path)
    name = os.path.basename(output_path) if output_path else os.path.basename(os.path.normpath(input_path))
    report, tensors = convert_state_dict(state, chosen, fmt, name, input_label=input_path)
    report.input_files = files
    report.forced = force
    if not output_path:
        return report
    if not tensors:
        report.notes.append("Nothing to write: no adapter weights were found.")
        return report
    if report.ok or force:
        write_adapter(tensors, output_path, fmt)
        report.written = output_path
        if force:
            report.report_file = output_path + ".report.json"
            with open(report.report_file, "w", encoding="utf-8") as f:
                json.dump(report.to_dict(), f, indent=1)
    return report


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lib_instantid.convert",
        description="Convert an IP-Adapter / FaceID training checkpoint (tutorial_train*.py + accelerate: "
                    "image_proj_model.*, adapter_modules.N.*, unet.*) into the published adapter layout "
                    "({'image_proj', 'ip_adapter'} .bin or flat .safetensors), validated against a template.",
        epilog="Examples:\n"
               "  python -m lib_instantid.convert out/checkpoint-50000 my-ip-adapter_sd15.bin\n"
               "  python -m lib_instantid.convert out/checkpoint-50000/model.safetensors my-faceid_sdxl.safetensors "
               "--template ip-adapter-faceid_sdxl\n"
               "  python -m lib_instantid.convert out/checkpoint-50000   (check only, writes nothing)\n"
               "Exit codes: 0 written (or check passed), 1 refused, 2 usage error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="accelerate checkpoint folder (model.safetensors or pytorch_model.bin) "
                                            "or a weights file (.safetensors, .bin, .pt, .pth)")
    p.add_argument("output", nargs="?", help="the adapter to write (.bin or .safetensors); omit to only check")
    p.add_argument("--template", metavar="NAME|FILE",
                   help="built-in template name (e.g. ip-adapter-plus_sd15; see --list-templates) or a published "
                        "adapter file to match; default: picked from the weights")
    p.add_argument("--format", choices=("bin", "safetensors"), help="output format (default: from OUT's extension)")
    p.add_argument("--force", action="store_true",
                   help="write even if validation fails, with OUT.report.json beside it")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--list-templates", action="store_true", help="list the built-in templates and exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_templates:
        for t in rules.builtin_templates():
            print(f"{t.name:48s} {t.family:24s} {t.base}")
        return 0
    if not args.input:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: the input checkpoint is required", file=sys.stderr)
        return 2
    try:
        report = convert(args.input, args.output, args.template, args.format, args.force)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except InstantIDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.text())
    if args.output:
        return 0 if report.written else 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
