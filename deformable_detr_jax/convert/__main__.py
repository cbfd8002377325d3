"""`python -m deformable_detr_jax.convert SRC DST`: PyTorch checkpoint <-> JAX folder.

    # hub id (downloaded into huggingface_hub's cache), hub-style folder, .safetensors/.bin file
    # or fundamentalvision .pth -> save_pretrained folder
    python -m deformable_detr_jax.convert SenseTime/deformable-detr out/deformable-detr
    python -m deformable_detr_jax.convert r50_deformable_detr.pth out/dd --config config.json
    # save_pretrained folder (or any PyTorch checkpoint) -> transformers folder
    python -m deformable_detr_jax.convert out/dd out/dd-hf --to pytorch

Prints one line, `converted hub checkpoint (variant two-stage, 40.1M parameters) -> DST`.
On failure prints one `error: <message>` line to stderr and leaves no DST behind (exit statuses:
the table in `deformable_detr_jax/cli/exits.py`). A `preprocessor_config.json` in SRC is carried
over (`--to pytorch` writes the default settings when SRC has none). SRC is resolved by
`convert.hub.resolve_model`: an existing local path wins, else a hub id `org/name` is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
from flax import nnx

from deformable_detr_jax.checkpoint import is_pretrained_folder, load_pretrained, save_pretrained
from deformable_detr_jax.cli import exits
from deformable_detr_jax.convert.errors import CheckpointError
from deformable_detr_jax.convert.hub import resolve_model
from deformable_detr_jax.convert.loading import (
    import_pytorch_checkpoint,
    read_processor,
    save_pytorch_checkpoint,
)

PROG = "python -m deformable_detr_jax.convert"


def parameter_count(model) -> int:
    """Number of trainable parameters (shared heads counted once)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deformable_detr_jax.convert",
        description="Convert Deformable DETR checkpoints between PyTorch (hub folders, "
        ".safetensors, .bin, fundamentalvision .pth) and this package's orbax folders.",
    )
    parser.add_argument(
        "src", help="checkpoint file or folder to read, or a Hugging Face hub id (org/name)"
    )
    parser.add_argument("dst", help="folder to create")
    parser.add_argument(
        "--to",
        choices=("jax", "pytorch"),
        default="jax",
        help="jax (default): write a save_pretrained folder; pytorch: write config.json + "
        "model.safetensors for transformers' from_pretrained",
    )
    parser.add_argument(
        "--config",
        help="transformers config.json (file or folder) for a PyTorch SRC; default: the "
        "config.json beside the weights, else read off the weights",
    )
    parser.add_argument(
        "--num-heads",
        type=int,
        help="attention heads, when the config is read off the weights (default 8)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    return parser


def convert(
    src: str,
    dst: str,
    *,
    to: str = "jax",
    config: str | None = None,
    num_heads: int | None = None,
    overwrite: bool = False,
) -> str:
    """Runs one conversion; returns the summary line."""
    where = resolve_model(src)
    if is_pretrained_folder(where):
        if config is not None or num_heads is not None:
            raise ValueError(
                f"{src} is a save_pretrained folder; --config/--num-heads apply "
                "to PyTorch checkpoints only"
            )
        model, key_format, processor = load_pretrained(where), "jax", read_processor(where)
    else:
        imported = import_pytorch_checkpoint(where, config, num_heads=num_heads)
        model, key_format, processor = imported.model, imported.format, imported.processor
    if to == "jax":
        save_pretrained(model, dst, processor=processor, overwrite=overwrite)
    else:
        save_pytorch_checkpoint(model, dst, processor=processor, overwrite=overwrite)
    millions = parameter_count(model) / 1e6
    return (
        f"converted {key_format} checkpoint (variant {model.config.variant}, "
        f"{millions:.1f}M parameters) -> {dst}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    exits.quiet_orbax()
    return exits.guarded(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    try:
        line = convert(
            args.src,
            args.dst,
            to=args.to,
            config=args.config,
            num_heads=args.num_heads,
            overwrite=args.overwrite,
        )
    except OSError as e:
        code = exits.WRITE_FAILED if e.errno in exits.WRITE_ERRNOS else exits.BAD_INPUT
        return exits.report(PROG, str(e), code)
    except (CheckpointError, ValueError) as e:
        return exits.report(PROG, str(e), exits.BAD_INPUT)
    print(line)
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
