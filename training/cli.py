"""Command line: ``python -m training {prepare,train,evaluate,migrate,quantize}`` (also
``sentiment-train``).

Options are generated from the configuration dataclasses, so ``--help`` lists every
hyper-parameter with its default and meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from service.bundle import PRECISIONS
from training.config import (
    MAX_INT8_DROP,
    FinetuneConfig,
    ModelConfig,
    PrepareConfig,
    TrainConfig,
    default_data_source,
)
from training.errors import TrainingError

CONFIGS: dict[str, type] = {"prepare": PrepareConfig, "model": ModelConfig, "train": TrainConfig}


def log(message: str) -> None:
    tqdm.write(message)  # keeps progress bars intact


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args, argv))
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a GloVe-initialised RNN sentiment classifier on IMDb and export "
        "a TorchScript bundle for the service.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    prepare = commands.add_parser(
        "prepare",
        formatter_class=fmt,
        help="tokenise IMDb and build the embedding matrix into the cache",
        description="Read IMDb, split off validation, build the tokenizer on the training part, "
        "tokenise all splits and build the embedding matrix; write them to the cache folder.",
    )
    _add_options(prepare, PrepareConfig)
    prepare.set_defaults(handler=cmd_prepare)

    train = commands.add_parser(
        "train",
        formatter_class=fmt,
        help="train, calibrate and export a bundle to models/<name>/",
        description="Train on a prepared folder (running `prepare` first when its cache is "
        "missing), fit a temperature on validation, export and verify the TorchScript bundle, "
        "and report validation and test metrics.",
    )
    train.add_argument(
        "--prepared",
        type=Path,
        default=None,
        help="train from this prepared folder (e.g. one copied from another machine) instead "
        "of the one the prepare options name",
    )
    train.add_argument(
        "--sentences",
        type=Path,
        default=None,
        help="also report accuracy on this labelled sentence file (text<TAB>0|1 per line, e.g. "
        "../shared/data/imdb_labelled.txt) in the card; never trained on",
    )
    for config_cls in CONFIGS.values():
        _add_options(train, config_cls)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        formatter_class=fmt,
        help="re-score a bundle on the official test set (and a sentence file)",
        description="Score a bundle on the 25k official test reviews (and, with --sentences, "
        "on a labelled sentence file) using only the bundle's files, and compare with the "
        "metrics its card reports.",
    )
    _add_scoring_options(evaluate)
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--batch-size", type=int, default=256, help="reviews per batch")
    evaluate.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="float32",
        help="precision to score in, as the service's SENTIMENT_DTYPE (half is meant for CUDA; "
        "int8 scores the bundle's int8 variant against its own card figures)",
    )
    evaluate.add_argument(
        "--runtime",
        choices=("torchscript", "onnx"),
        default="torchscript",
        help="what runs the model: model.pt (or the --dtype variant) in TorchScript, or the "
        "bundle's model.onnx in ONNX Runtime on the CPU (float32, scored against the card's "
        "float32 figures), as the service's SENTIMENT_RUNTIME",
    )
    evaluate.add_argument(
        "--tolerance",
        type=float,
        default=0.001,
        help="largest accepted difference from the card's accuracies (CPU and GPU kernels "
        "round differently, which can flip a review on the decision boundary)",
    )
    evaluate.set_defaults(handler=cmd_evaluate)

    migrate = commands.add_parser(
        "migrate",
        formatter_class=fmt,
        help="convert a bundle of an older format to the current one, in place",
        description="Rewrite a format-2 bundle as the current format with the same weights: "
        "the network is rebuilt from the card, checked against the old model.pt and exported "
        "with every entry point verified.",
    )
    migrate.add_argument("bundle", type=Path, help="bundle folder, e.g. models/imdb-bigru")
    migrate.set_defaults(handler=cmd_migrate)

    quantize = commands.add_parser(
        "quantize",
        formatter_class=fmt,
        help="add an int8 CPU variant (model.int8.pt) to a bundle, in place",
        description="Quantise the bundle's GRU and linear layers to int8 (dynamic "
        "quantisation), score the result on the 25k official test reviews (and --sentences) "
        "and add it to the bundle with its own figures in the card, if its test accuracy is "
        "within --max-drop of model.pt's. The service serves it on a CPU by default.",
    )
    _add_scoring_options(quantize)
    quantize.add_argument(
        "--max-drop",
        type=float,
        default=MAX_INT8_DROP,
        help="test accuracy the variant may lose against model.pt's card figure",
    )
    quantize.set_defaults(handler=cmd_quantize)
    finetune = commands.add_parser(
        "finetune",
        formatter_class=fmt,
        help="fine-tune a bundle on short texts that teach reading (negation, concession...)",
        description="Start from a bundle's weights and train on crops, counterfactual "
        "negations and concessions made from the training reviews, mixed with whole reviews; "
        "keep the best epoch by validation and the behaviour suite's dev half; calibrate per "
        "length band and export a new bundle.",
    )
    _add_scoring_options(finetune)  # the bundle to start from; --sentences is never trained on
    _add_options(finetune, FinetuneConfig)
    finetune.set_defaults(handler=cmd_finetune)

    behave = commands.add_parser(
        "behave",
        formatter_class=fmt,
        help="run the behaviour suite (negation, concession, robustness, fairness...) on a bundle",
        description="Score a bundle on the behaviour suite (training/behaviour.py) and print "
        "the pass rate of every test; --check compares with the card's figures, --write-card "
        "records them.",
    )
    behave.add_argument("bundle", type=Path, help="bundle folder, e.g. models/imdb-bigru")
    behave.add_argument(
        "--half",
        choices=("dev", "test", "both"),
        default="both",
        help="dev: the half that choices are made on; test: the reported half",
    )
    behave.add_argument("--dtype", choices=PRECISIONS, default="float32", help="precision")
    behave.add_argument("--failures", action="store_true", help="print failing cases")
    behave.add_argument(
        "--write-card", action="store_true", help="record the figures in the bundle's card"
    )
    behave.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless every pass rate equals the card's within --tolerance",
    )
    behave.add_argument("--tolerance", type=float, default=0.01, help="for --check")
    behave.set_defaults(handler=cmd_behave)
    return parser


def _add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """A bundle and the sets it is scored on: `evaluate`, `quantize` and `finetune` alike."""
    parser.add_argument("bundle", type=Path, help="bundle folder, e.g. models/imdb-bigru")
    parser.add_argument("--data", default=default_data_source(), help="IMDb source")
    parser.add_argument("--data-sha256", default=None, help="expected SHA-256 of the tarball")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="cache folder")
    parser.add_argument(
        "--sentences",
        type=Path,
        default=None,
        help="also score this labelled sentence file (text<TAB>0|1 per line), e.g. "
        "../shared/data/imdb_labelled.txt",
    )


def _add_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    group = parser.add_argument_group(f"{config_cls.__name__} options")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "dest": f.name}
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is tuple:  # tuple[X, ...]: zero or more values
            kwargs["type"], kwargs["nargs"] = typing.get_args(kind)[0], "*"
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
        factory = f.default_factory
        kwargs["default"] = f.default if factory is dataclasses.MISSING else factory()
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _config(config_cls: type, args: argparse.Namespace) -> Any:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def cmd_prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from training.prepare import prepare

    prepare(_config(PrepareConfig, args), log=log)
    return 0


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    # Imported here so that `--help` and `prepare` do not pay for torch's import.
    from service.bundle import CARD_FILE, MODEL_FILE
    from training.config import to_jsonable
    from training.data import load_sentences
    from training.export import export_bundle
    from training.metrics import classification_metrics, fit_temperature, format_metrics
    from training.model import count_parameters
    from training.prepare import TokenizedSplit, load_prepared, prepare, prepared_dir
    from training.tokenizer import encode
    from training.train import EVAL_BATCH, predict_logits, resolve_device, train

    prepare_cfg: PrepareConfig = _config(PrepareConfig, args)
    model_cfg: ModelConfig = _config(ModelConfig, args)
    cfg: TrainConfig = _config(TrainConfig, args)

    folder = args.prepared or prepared_dir(prepare_cfg)
    if args.prepared is None and not folder.exists():
        log(f"no prepared data at {folder}: running prepare")
        folder = prepare(prepare_cfg, log=log)
    prepared = load_prepared(folder)
    # Read before hours of training, so that a bad file fails at once.
    sentences = load_sentences(args.sentences) if args.sentences else None

    checkpoint = prepare_cfg.cache_dir / "runs" / cfg.name / "best.pt"
    result = train(prepared, model_cfg, cfg, checkpoint=checkpoint, log=log)

    # Scored on the training device: a GPU scores the 25k test reviews in seconds; a
    # difference of CPU and GPU rounding is within `evaluate`'s tolerance.
    device = resolve_device(cfg.device)
    model = result.model.to(device)
    truncation = cfg.truncation
    test = prepared.splits["test"].sample(cfg.test_limit, np.random.default_rng(cfg.seed))
    sets = {"validation": prepared.splits["val"], "test": test}
    if len(result.short_val):
        sets["validation_short"] = result.short_val
    if sentences is not None:
        sets["sentences"] = TokenizedSplit(
            encode(prepared.tokenizer, sentences.texts), sentences.labels
        )
    logits = {
        name: predict_logits(model, split.ids, truncation, EVAL_BATCH, device, name)
        for name, split in sets.items()
    }
    model.cpu()
    temperature = fit_temperature(sets["validation"].labels, logits["validation"])
    metrics = {
        name: classification_metrics(split.labels, logits[name], temperature)
        for name, split in sets.items()
    }
    raw_test = classification_metrics(sets["test"].labels, logits["test"])

    card = {
        "name": cfg.name,
        "version": cfg.model_version,
        "task": "binary sentiment classification of English movie reviews",
        "architecture": {
            "type": "SentimentRNN",
            **to_jsonable(model_cfg),
            "vocab_size": int(prepared.embeddings.shape[0]),
            "embed_dim": int(prepared.embeddings.shape[1]),
        },
        "hyperparameters": to_jsonable(cfg),
        "data": {**prepared.meta["data"], "prepare": prepared.meta["config"]},
        "vectors": prepared.meta["vectors"],
        "training": {
            "device": result.device,
            "best_epoch": result.best_epoch,
            "seconds": result.seconds,
            "history": result.history,
        },
        "metrics": metrics,
        "calibration": {
            "method": "temperature scaling fitted on validation log-loss",
            "temperature": temperature,
            "test_ece_before": raw_test["ece"],
            "test_ece_after": metrics["test"]["ece"],
        },
        "truncation": truncation.model_dump(),
        "command": "python -m training " + shlex.join(argv),
    }
    check_batch = sets["validation"].ids[:64]
    bundle = export_bundle(model, prepared.tokenizer, cfg.models_dir / cfg.name, check_batch, card)

    size_mb = (bundle / MODEL_FILE).stat().st_size / 1e6
    log("")
    log(f"bundle     {bundle}/ ({MODEL_FILE} {size_mb:.1f} MB, {CARD_FILE})")
    log(
        f"model      {count_parameters(model):,} parameters, best epoch {result.best_epoch}, "
        f"{result.seconds:.0f} s on {result.device}"
    )
    log(
        f"calibrated temperature {temperature} (test ECE {raw_test['ece']:.4f} -> "
        f"{metrics['test']['ece']:.4f})"
    )
    for name, figures in metrics.items():
        log(format_metrics(name, figures))
    return 0


def cmd_migrate(args: argparse.Namespace, argv: list[str]) -> int:
    from training.migrate import migrate

    migrate(args.bundle, log=log)
    return 0


def cmd_quantize(args: argparse.Namespace, argv: list[str]) -> int:
    from training.metrics import format_metrics
    from training.quantize import quantize_bundle

    metrics = quantize_bundle(
        args.bundle,
        args.data,
        args.cache_dir,
        args.sentences,
        args.data_sha256,
        args.max_drop,
        log=log,
    )
    for name, figures in metrics.items():
        log(format_metrics(f"int8 {name}", figures))
    log(f"{args.bundle}: int8 variant added ({args.bundle}/model.int8.pt, card section int8)")
    return 0


def cmd_evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    from training.evaluate import evaluate_bundle
    from training.metrics import format_metrics
    from training.train import resolve_device

    metrics, claimed_metrics = evaluate_bundle(
        args.bundle,
        args.data,
        args.cache_dir,
        resolve_device(args.device),
        args.data_sha256,
        args.batch_size,
        args.dtype,
        args.sentences,
        args.runtime,
    )
    reproduced = True
    for name, measured in metrics.items():
        log(format_metrics(name, measured))
        if name not in claimed_metrics:
            log(f"the card reports no {name} accuracy to compare with")
            continue
        claimed = claimed_metrics[name].accuracy
        diff = abs(measured["accuracy"] - claimed)
        verdict = "reproduced" if diff <= args.tolerance else "NOT reproduced"
        reproduced &= diff <= args.tolerance
        log(
            f"card {name} accuracy {claimed:.4f}, measured {measured['accuracy']:.4f}: "
            f"{verdict} (difference {diff:.4f}, tolerance {args.tolerance})"
        )
    return 0 if reproduced else 1


def cmd_behave(args: argparse.Namespace, argv: list[str]) -> int:
    from training import behaviour
    from training.evaluate import behaviour_figures, record_behaviour

    halves = behaviour.HALVES if args.half == "both" else (args.half,)
    figures, outcomes, card = behaviour_figures(args.bundle, args.dtype, halves)
    for half in halves:
        log(behaviour.format_table(outcomes[half], half, args.failures))
    if args.write_card:
        record_behaviour(args.bundle, args.dtype, figures)
        log(f"{args.bundle}: behaviour figures ({args.dtype}) recorded in the card")
    if not args.check:
        return 0
    claimed = (card.behaviour or {}).get(args.dtype)
    if claimed is None:
        log(f"the card holds no behaviour figures for {args.dtype}")
        return 1
    agree = True
    for half in halves:
        for name, measured in figures[half]["tests"].items():
            said = claimed.get(half, {}).get("tests", {}).get(name, {}).get("pass_rate")
            if said is None or abs(said - measured["pass_rate"]) > args.tolerance:
                log(f"{half} {name}: card {said}, measured {measured['pass_rate']}")
                agree = False
    log("card's behaviour figures " + ("reproduced" if agree else "NOT reproduced"))
    return 0 if agree else 1


def cmd_finetune(args: argparse.Namespace, argv: list[str]) -> int:
    from training import behaviour
    from training.calibrate import calibrate_and_score
    from training.config import to_jsonable
    from training.data import load_imdb, load_sentences
    from training.evaluate import behaviour_figures, record_behaviour
    from training.export import export_bundle
    from training.finetune import finetune
    from training.metrics import format_metrics

    cfg: FinetuneConfig = _config(FinetuneConfig, args)
    sentences = load_sentences(args.sentences) if args.sentences else None
    reviews = load_imdb(args.data, args.cache_dir, args.data_sha256)
    model, record, splits, source = finetune(args.bundle, cfg, reviews["train"], log)
    calibration, metrics = calibrate_and_score(model, source, splits, reviews["test"], sentences)
    card = {
        **source.card.model_dump(include={"task", "architecture", "truncation", "data", "vectors"}),
        "name": cfg.name,
        "version": cfg.model_version,
        "hyperparameters": {**source.card.hyperparameters, "finetune": to_jsonable(cfg)},
        "training": record,
        "metrics": metrics,
        "calibration": calibration,
        "command": "python -m training " + shlex.join(argv),
    }
    folder = export_bundle(
        model, source.tokenizer, cfg.models_dir / cfg.name, splits.val.ids[:64], card
    )
    figures, outcomes, _ = behaviour_figures(folder, "float32", behaviour.HALVES)
    record_behaviour(folder, "float32", figures)
    log(behaviour.format_table(outcomes["test"], "test"))
    log(f"bundle     {folder}/")
    log(f"calibration {calibration}")
    for name, figures in metrics.items():
        log(format_metrics(name, figures))
    return 0
