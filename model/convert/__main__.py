"""python -m model.convert DIR --out FILE.pt [--dataset NAME] [--training]

Converts a Hugging Face OneFormer save_pretrained directory into our model file (model/checkpoint.py)."""

from __future__ import annotations

import argparse
import logging

from model.checkpoint import build_from_config, load_state, save_model
from model.convert import convert_transformers_checkpoint
from model.presets import DATASETS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="directory with config.json and model.safetensors / pytorch_model.bin")
    parser.add_argument("--out", required=True, help="checkpoint file to write (.pt)")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="dataset settings (inference thresholds); guessed from the class count if omitted")
    parser.add_argument("--training", action="store_true", help="also build the text mapper (fresh if absent)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config, state = convert_transformers_checkpoint(args.directory, dataset=args.dataset, training=args.training)
    model = build_from_config(config)
    load_state(model, state, source=args.directory)
    save_model(model, config, args.out)
    parameters = sum(p.numel() for p in model.parameters())
    logging.info("wrote %s: backbone %s, %d classes, %d queries, %.1fM parameters", args.out, config.backbone,
                 config.num_classes, config.num_queries, parameters / 1e6)


if __name__ == "__main__":
    main()
