"""python -m model.convert DIR --out FILE.pt [--dataset NAME] [--training] [--classes classes.json]

Converts a Hugging Face OneFormer save_pretrained directory into our model file (model/checkpoint.py), with
the classes inside it when they are known (--classes, else the directory's id2label and thing ids)."""

from __future__ import annotations

import argparse
import logging

from model.checkpoint import build_from_config, load_state, save_model
from model.classes import ClassesFileError, read_classes_file
from model.convert import convert_transformers_checkpoint, transformers_classes
from model.presets import DATASETS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="directory with config.json and model.safetensors / pytorch_model.bin")
    parser.add_argument("--out", required=True, help="checkpoint file to write (.pt)")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="dataset settings (inference thresholds); guessed from the class count if omitted")
    parser.add_argument("--training", action="store_true", help="also build the text mapper (fresh if absent)")
    parser.add_argument("--classes", default=None,
                        help="classes.json (contiguous_id, category_id, name, isthing) to store in the model "
                             "file; default: config.json's id2label with preprocessor_config.json's thing "
                             "ids")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config, state = convert_transformers_checkpoint(args.directory, dataset=args.dataset, training=args.training)
    model = build_from_config(config)
    load_state(model, state, source=args.directory)
    classes = _classes(args, config.num_classes)
    save_model(model, config, args.out, classes=classes)
    parameters = sum(p.numel() for p in model.parameters())
    logging.info("wrote %s: backbone %s, %d classes, %d queries, %.1fM parameters", args.out, config.backbone,
                 config.num_classes, config.num_queries, parameters / 1e6)


def _classes(args, num_classes: int):
    """The classes to store: --classes, else the directory's; none (and a warning saying why) if unknown."""
    if args.classes is not None:
        classes = read_classes_file(args.classes)
        if classes.num_classes != num_classes:
            raise ClassesFileError(
                f"{args.classes}: {classes.num_classes} classes, but the model predicts {num_classes}"
            )
        return classes
    classes, missing = transformers_classes(args.directory, num_classes)
    if classes is None:
        logging.warning("the model file will name no classes (%s): predict, export and evaluate then need "
                        "--classes; pass --classes classes.json here to store them", missing)
    return classes


if __name__ == "__main__":
    main()
