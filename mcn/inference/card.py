"""A fusion run's model card: `MODEL_CARD_<type>.md` for people and `MODEL_CARD_<type>.json` for code, beside the
run's results (and a copy beside every export).

It holds the data, split and classes; the experts and the fusion type; the learning rates; the test accuracy, NLL
and ECE with the baselines of the same experts, copied from the results JSON (`FusionResults`), never recomputed;
the seed-study row when a study report (`*_study.csv`, `mcn.evaluate`) lies above the run; the code snapshot's
hash; how to load the model. And what using the model needs: the input rule (`InputRule`) and the temperature
fitted on the run's validation part (`mcn.evaluation.baselines.fit_temperature` on the fused logits), which
`mcn.load` and `mcn.predict` read from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mcn import distributed
from mcn.data.prepare import PreparedData, make_batches, prepare_data
from mcn.errors import CheckpointError, FileError
from mcn.evaluation.baselines import calibration, fit_temperature
from mcn.evaluation.components import load_complete
from mcn.files import FusionResults, FusionRunFiles, load_checkpoint, read_csv, write_json, write_text
from mcn.files.code import describe
from mcn.inference.rule import InputRule
from mcn.models import ExpertSpec
from mcn.training.config import expert_specs
from mcn.training.loop import predict
from mcn.training.runtime import Runtime

CARD_FORMAT = "mcn-model-card-v1"
STUDY_LEVELS = 4  # how far above a run a study report is looked for (pipeline: <root>/seed_<s>/fusion/<run>)


def finished(files: FusionRunFiles) -> FusionResults:
    """The run's results record; CheckpointError naming what is missing when the run has no finished model."""
    if not files.complete().is_file() or not files.results.is_file():
        missing = files.complete() if not files.complete().is_file() else files.results
        raise CheckpointError(
            f"{files.root} holds no finished {files.fusion_type} model ({missing.name} missing): the run has not "
            f"finished; let it finish (or resume it), or point at a finished run"
        )
    return FusionResults.read(files.results, files.fusion_type)


def input_rule(data: PreparedData, config: dict) -> InputRule:
    return InputRule.of(data, str(config["data"].get("interpolation", "bilinear")))


def fitted_temperature(val: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The temperature of the fused logits, fitted on the validation part: val = (every head's logits [K+1, N, C],
    labels [N]); the record the card keeps (`temperature`, `flag`, `val_images`, and the val NLL before and after)."""
    logits, labels = val
    temperature, flag = fit_temperature(logits[0], labels)
    return {
        "temperature": temperature,
        "flag": flag,
        "val_images": len(labels),
        "val_nll": calibration(logits[0], labels)["nll"],
        "val_nll_calibrated": calibration(logits[0] / temperature, labels)["nll"],
    }


def write_model_card(files: FusionRunFiles, data: PreparedData, val: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The card of a fusion run that has just written its results (the fusion recipe's last step): `data` is its
    prepared data, `val` every head's logits on the validation part and the labels."""
    if distributed.is_main():
        results = finished(files)
        save_card(card(files, input_rule(data, results.config), fitted_temperature(val)), files.root, files.fusion_type)


def run_card(files: FusionRunFiles) -> dict:
    """The run's card, read back; a finished run without one (finished before cards existed, or its card deleted) gets
    it written now, from its data and its best model's validation logits."""
    results = finished(files)
    path = card_paths(files.root, files.fusion_type)[1]
    if path.is_file():
        return read_card(path)
    val, data = validation_logits(results.config, load_complete(files.root, files.fusion_type))
    out = card(files, input_rule(data, results.config), fitted_temperature(val))
    save_card(out, files.root, files.fusion_type)
    return out


def validation_logits(config: dict, model: torch.nn.Module) -> tuple[tuple[torch.Tensor, torch.Tensor], PreparedData]:
    """Every head's logits [K+1, N, C] and the labels on the validation part of the run of `config` (its resolved
    config), on the device and at the precision its trainer settings choose; and the run's prepared data."""
    cfg = OmegaConf.create(config)
    data = prepare_data(cfg, expert_specs(cfg))
    runtime = Runtime.from_config(OmegaConf.merge(cfg.trainer, {"compile": False}))
    batches = make_batches(data.part("fusion_val_indices"), data, cfg, runtime, train=False)
    return predict(runtime.prepare(model), batches, runtime), data


def read_card(path: Path) -> dict:
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FileError(f"cannot read the model card {path} ({e}); delete it and it is written anew") from None
    if not isinstance(out, dict) or out.get("format") != CARD_FORMAT:
        raise FileError(f"{path} is not an mcn model card (format {CARD_FORMAT!r}); delete it and it is written anew")
    InputRule.from_dict(out.get("input") or {}, path)  # refuses a card without a whole rule, naming it
    return out


def card_paths(folder: Path, fusion_type: str) -> tuple[Path, Path]:
    """(Markdown, JSON) of a run's card, in `folder`."""
    return folder / f"MODEL_CARD_{fusion_type}.md", folder / f"MODEL_CARD_{fusion_type}.json"


def save_card(out: dict, folder: Path, fusion_type: str) -> tuple[Path, Path]:
    md, js = card_paths(Path(folder), fusion_type)
    return write_text(md, markdown(out)), write_json(js, out)


def refreshed(files: FusionRunFiles) -> dict:
    """The run's card with what may have changed since it was written (a study report made later) read anew; the input
    rule and temperature kept."""
    old = run_card(files)
    return card(files, InputRule.from_dict(old["input"], files.root), old["calibration"])


def card(files: FusionRunFiles, rule: InputRule, temperature: dict) -> dict:
    """The card of a finished run (see the module docstring)."""
    r = finished(files)
    config = r.config or {}
    arch = load_checkpoint(files.complete(), "complete")["architecture"]
    split = config.get("split", {})
    joint = (r.baselines or {}).get("joint") or {}
    pretrained = (r.baselines or {}).get("pretrained") or {}
    test = {"accuracy": r.test_accuracy, **{k: (r.test_calibration or {}).get(k) for k in ("nll", "ece")}}
    run = files.root.resolve()
    return {
        "format": CARD_FORMAT,
        "fusion_type": r.fusion_type,
        "run": str(run),
        "checkpoint": files.complete().name,
        "best_epoch": r.best_epoch,
        "chosen_model": chosen_model(r),
        "best_val_accuracy": r.best_val_accuracy,
        "data": {
            "name": config.get("data", {}).get("name"),
            "classes": rule.classes,
            "split": {"scheme": split.get("scheme"), "seed": r.split_seed, "hash": r.split_hash},
        },
        "experts": [
            {"index": i, "preset": ExpertSpec.parse(a).label, "architecture": a, "from": src}
            for i, (a, src) in enumerate(zip(arch["experts"], r.experts_from))
        ],
        "fusion": arch["fusion"],
        "seed": r.seed,
        "learning_rates": r.learning_rates,
        "expert_loss_weight": r.expert_loss_weight,
        "test": test,
        "baselines": {"joint": _metrics(joint), "pretrained": _metrics(pretrained) if pretrained else None},
        "seed_study": _study_rows(files),
        "code": r.code,
        "input": rule.as_dict(),
        "calibration": temperature,
        "how_to_load": {
            "python": f'import mcn\nmodel = mcn.load("{run}")\nprediction = model.predict(["image.png"])',
            "command": f"python -m mcn.predict {run} images/ --output predictions.csv",
        },
    }


def chosen_model(r: FusionResults) -> str:
    """What the best epoch's weights are, in words: the probe, a fine-tuning epoch, or WiSE-FT's mixture."""
    wise = r.wise_ft or {}
    if wise.get("selected") and wise.get("epoch") == r.best_epoch:
        first, last = wise["between_epochs"]
        return f"WiSE-FT: weight {wise['weight']:g} between epochs {first} and {last}"
    if r.best_epoch == 0 and r.probe is not None:
        return "the probe: fusion module and global head fitted on the frozen experts"
    return f"training epoch {r.best_epoch}"


def _metrics(baselines: dict) -> dict:
    return {name: {k: v[k] for k in ("accuracy", "nll", "ece")} for name, v in baselines.items() if v is not None}


def _study_rows(files: FusionRunFiles) -> list[dict] | None:
    """This fusion type's test-accuracy rows of the nearest study report above the run (None: there is none)."""
    for folder in list(files.root.resolve().parents)[:STUDY_LEVELS]:
        for path in sorted(folder.glob("*_study.csv")):
            try:
                rows = read_csv(path, columns=("group", "fusion_type", "quantity"))
            except FileError:
                continue
            found = [
                {k: v for k, v in row.items() if v not in ("", None)} | {"report": str(path)}
                for row in rows
                if row["fusion_type"] == files.fusion_type and row["quantity"].startswith("test_accuracy")
            ]
            if found:
                return found
    return None


def _num(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def markdown(c: dict) -> str:
    """The card for people: the JSON's numbers, as they are."""
    data, rule, cal = c["data"], c["input"], c["calibration"]
    experts = ", ".join(e["preset"] + (" (pretrained)" if e["from"] else " (from scratch)") for e in c["experts"])
    resize = rule["resize"]
    lines = [
        f"# Model card: {c['fusion_type']} fusion",
        "",
        f"Run `{c['run']}`, best epoch {c['best_epoch']} ({c['chosen_model']}; validation accuracy "
        f"{_num(c['best_val_accuracy'])}), "
        f"checkpoint `{c['checkpoint']}`.",
        "",
        "## Data",
        "",
        f"- data set: {data['name']}; split: {data['split']['scheme']}, seed {data['split']['seed']}, "
        f"hash {data['split']['hash']}",
        f"- classes ({len(data['classes'])}): {', '.join(data['classes'])}",
        f"- input: {rule['channels']} channel(s), decoded at {rule['size'][0]}x{rule['size'][1]} "
        f"({rule['interpolation']})"
        + (f", resized to {resize['size'][0]}x{resize['size'][1]} ({resize['interpolation']})" if resize else "")
        + f", mean {rule['mean']}, std {rule['std']} (in [0, 1] units)",
        "",
        "## Model",
        "",
        f"- experts ({len(c['experts'])}): {experts}",
        f"- fusion: {c['fusion'].get('name', c['fusion_type'])}; seed {c['seed']}",
        f"- learning rates: {json.dumps(c['learning_rates'])}",
        f"- calibration: temperature {cal['temperature']:.4f} fitted on {cal['val_images']} validation images"
        + (f" ({cal['flag']})" if cal.get("flag") else ""),
        "",
        "## Test set",
        "",
        "| model | accuracy | NLL | ECE |",
        "| --- | --- | --- | --- |",
        f"| **fusion** | {_num(c['test']['accuracy'])} | {_num(c['test']['nll'])} | {_num(c['test']['ece'])} |",
    ]
    for experts_state in ("joint", "pretrained"):
        for name, m in (c["baselines"].get(experts_state) or {}).items():
            lines.append(
                f"| {name} ({experts_state} experts) | {_num(m['accuracy'])} | {_num(m['nll'])} | {_num(m['ece'])} |"
            )
    if c["seed_study"]:
        lines += ["", "## Seed study", "", f"From `{c['seed_study'][0]['report']}`:", ""]
        lines += ["| group | quantity | n | mean | 95% CI | verdict |", "| --- | --- | --- | --- | --- | --- |"]
        for row in c["seed_study"]:
            lines.append(
                f"| {row['group']} | {row['quantity']} | {row.get('n', '')} | {row.get('mean', '')} | "
                f"[{row.get('ci_low', '')}, {row.get('ci_high', '')}] | {row.get('verdict', '')} |"
            )
    code = c.get("code") or {}
    lines += [
        "",
        "## Code",
        "",
        f"- code snapshot: {describe(code) if code else 'unknown'}",
        "",
        "## How to load",
        "",
        "```python",
        c["how_to_load"]["python"],
        "```",
        "",
        "```bash",
        c["how_to_load"]["command"],
        "```",
        "",
    ]
    return "\n".join(lines)
