"""Command line: convert between official X2-VLM checkpoints, safetensors and our params format.

    python -m x2vlm_jax.convert official-to-jax SRC.th OUT_DIR [--image-size 384] [...]
    python -m x2vlm_jax.convert jax-to-official OUT_DIR DST.th
    python -m x2vlm_jax.convert official-to-safetensors SRC.th DST.safetensors
    python -m x2vlm_jax.convert jax-to-safetensors OUT_DIR DST.safetensors

Sources named `*.safetensors` are read as safetensors, anything else as a torch pickle. Every
import prints the coverage report and exits with status 1 on any mismatch that is not allowed
by `--allow-missing` / `--allow-unexpected` / `--allow-check`. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.convert.official_config import infer_config, official_config_dict


def _read_official(path: pathlib.Path):
  if path.suffix == ".safetensors":
    from x2vlm_jax.convert.safetensors_io import load_safetensors

    sd, config = load_safetensors(path)
    return sd, config, []
  from x2vlm_jax.convert.torch_io import load_th

  return load_th(path)


def _write_official(path: pathlib.Path, sd, config) -> None:
  if path.suffix == ".safetensors":
    from x2vlm_jax.convert.safetensors_io import save_safetensors

    save_safetensors(path, sd, config)
  else:
    from x2vlm_jax.convert.torch_io import save_th

    save_th(path, sd, config)


def _import(args):
  """Reads an official checkpoint -> (config, our params), printing where everything came from."""
  sd, ck_config, notes = _read_official(args.src)
  for n in notes:
    print(f"note: {n}")
  cfg, source_size, cfg_notes = infer_config(
    sd,
    ck_config,
    variant=args.variant,
    num_heads=args.num_heads,
    text_layers=args.text_layers,
    fusion_layers=args.fusion_layers,
    image_size=args.image_size,
  )
  for n in cfg_notes:
    print(f"config: {n}")
  print(
    f"layout: {S.detect_layout(sd)}; {len(sd)} entries; checkpoint resolution {source_size}, "
    f"target {cfg.vision.image_size}"
  )
  allow = {k for k in ("missing", "unexpected", "check") if getattr(args, f"allow_{k}")}
  params, report = O.official_to_params(sd, cfg, allow=allow, source_image_size=source_size)
  print(report.summary())
  return cfg, params


def _load_ours(directory):
  from x2vlm_jax import params_io

  cfg, params = params_io.load_params(directory)
  return cfg, params


def cmd_official_to_jax(args) -> None:
  from x2vlm_jax import params_io

  cfg, params = _import(args)
  params_io.save_params(args.dst, cfg, params)
  print(f"wrote {args.dst}")


def cmd_jax_to_official(args) -> None:
  cfg, params = _load_ours(args.src)
  sd = O.params_to_official(params, cfg, layout=args.layout)
  _write_official(args.dst, sd, official_config_dict(cfg))
  print(
    f"wrote {len(sd)} entries ({S.count_parameters(_spec(cfg, args.layout)):,} "
    f"parameters) to {args.dst}"
  )


def _spec(cfg, layout):
  """The spec of the layout written (the default one of the config when not given)."""
  return S.official_state_spec(cfg, layout or (S.PLUS_PRETRAIN if cfg.xvlm_plus else S.PRETRAIN))


def cmd_official_to_safetensors(args) -> None:
  # Through our params: validates strictly, recomputes buffers, writes the canonical order.
  cfg, params = _import(args)
  sd = O.params_to_official(params, cfg, layout=args.layout)
  _write_official(args.dst, sd, official_config_dict(cfg))
  print(f"wrote {len(sd)} entries to {args.dst}")


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser of `python -m x2vlm_jax.convert`."""
  p = argparse.ArgumentParser(
    prog="python -m x2vlm_jax.convert", description=__doc__.split("\n")[0]
  )
  sub = p.add_subparsers(dest="command", required=True)

  def importing(sp):
    sp.add_argument(
      "--variant",
      choices=("tiny", "base", "large", "xlmr_base", "xlmr_large"),
      help="defaults for what shapes cannot tell (default: by text width)",
    )
    sp.add_argument("--num-heads", type=int, help="text/fusion attention heads (default width/64)")
    sp.add_argument(
      "--text-layers", type=int, help="text-only layers (default: first cross-attn layer)"
    )
    sp.add_argument("--fusion-layers", type=int, help="fusion layers (default: the rest)")
    sp.add_argument(
      "--image-size",
      type=int,
      help="target resolution; resizes rel-pos tables (docs/conversion.md#resolution-change)",
    )
    sp.add_argument("--allow-missing", action="store_true", help="our params absent from the file")
    sp.add_argument("--allow-unexpected", action="store_true", help="file entries we do not use")
    sp.add_argument("--allow-check", action="store_true", help="tied/buffer value differences")

  def layout(sp):
    sp.add_argument(
      "--layout",
      choices=S.LAYOUTS,
      default=None,
      help="official key layout to write (default pretrain, plus_pretrain for the multilingual "
      "model; finetune: no `bert.`, no MLM head, docs/fidelity.md#fine-tuning-layout; plus_*: "
      "docs/multilingual.md#conversion)",
    )

  for name, fn, src, dst, is_import in (
    ("official-to-jax", cmd_official_to_jax, "SRC.th", "OUT_DIR", True),
    ("jax-to-official", cmd_jax_to_official, "OUT_DIR", "DST.th", False),
    ("official-to-safetensors", cmd_official_to_safetensors, "SRC.th", "DST.safetensors", True),
    ("jax-to-safetensors", cmd_jax_to_official, "OUT_DIR", "DST.safetensors", False),
  ):
    sp = sub.add_parser(name, help=f"{src} -> {dst}")
    sp.add_argument("src", type=pathlib.Path, metavar=src)
    sp.add_argument("dst", type=pathlib.Path, metavar=dst)
    if is_import:
      importing(sp)
    if name != "official-to-jax":
      layout(sp)
    sp.set_defaults(fn=fn)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.fn(args)
  except C.ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (ValueError, FileNotFoundError, FileExistsError, ImportError, TypeError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
