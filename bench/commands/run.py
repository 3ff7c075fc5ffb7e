"""``bench run``: one fine-tuning cell, evaluated on the protocol's test cases."""
from __future__ import annotations

import json

from bench.options import nonneg_float, nonneg_int, positive_float, positive_int, seed


def _kv(text: str):
    key, _, value = text.partition("=")
    if not _:
        raise ValueError(f"--hp expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_run_arguments(p) -> None:
    """Arguments shared by run and tune."""
    p.add_argument("--method", required=True, help="a registered method (see `bench methods`)")
    p.add_argument("--dataset", default="phantom", help="registered dataset (default: phantom, embedded)")
    p.add_argument("--shots", type=positive_int, default=3, help="support cases: 1, 3 or 5 (default 3)")
    p.add_argument("--repeat", type=nonneg_int, default=0, help="protocol repeat (support draw), default 0")
    p.add_argument("--protocol", default=None, help="protocol version (default: newest)")
    p.add_argument("--foundation", default=None,
                   help="a suite recipe's name (phantom-v2, phantom-stunet-v1: shipped, else built on first use) or "
                        "an nnU-Net trained-model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth); "
                        "default: the phantom foundation phantom-v2")
    p.add_argument("--iterations", type=positive_int, default=None,
                   help="training iterations, the same for every method of a table (default: the dataset's "
                        "budget: phantom 20 per training case, at least 60; segrap2023 / lnq2023 12,500 = "
                        "LN-Seg-FM's 50 epochs x 250)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="iterations between tuning-set pseudo-Dice checks (default: the dataset's: phantom 10, "
                        "real releases 250, one nnU-Net epoch)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None,
                   help="default: the method's recipe (dgst-released: nnU-Net's SGD), else adamw")
    p.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="default: the method's recipe, else 3e-5")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=seed, default=None,
                   help="training seed (default: derived from the dataset, protocol version and repeat, "
                        "recorded in the result)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in $BENCH_HOME)")
    p.add_argument("--verbose", action="store_true",
                   help="also show nnU-Net's own output and library warnings (on stderr); tune: also each "
                        "trial's training progress")


def register(sub) -> None:
    p = sub.add_parser("run", help="fine-tune one method on one few-shot split and evaluate it",
                       description="Fine-tune a foundation model with METHOD on the support cases of one "
                                   "protocol split, predict the fixed test cases with nnU-Net, print per-case "
                                   "metrics and log the run to MLflow.")
    add_run_arguments(p)
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: the method's recipe, else 3e-3)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter, e.g. --hp gamma=4 (repeatable)")
    p.add_argument("--params", default="default",
                   help="'default', or 'tuned' to use the best parameters found by `bench tune`")
    from bench.commands.evaluate import add_extra_arguments
    add_extra_arguments(p)
    p.add_argument("--no-extra-eval", action="store_true",
                   help="skip forgetting and node-free false positives after the run (`bench evaluate` adds them)")
    p.add_argument("--augment", default=None, metavar="NAME",
                   help="training-data augmentation, e.g. synth-nodes (synthetic nodes from the support set's own; "
                        "docs/augment.md); its own row in tables: METHOD+synth")
    p.set_defaults(func=main)


def spec_from_args(args, **overrides):
    from bench.runner import RunSpec
    return RunSpec(method=args.method, dataset=args.dataset, shots=args.shots, repeat=args.repeat,
                   protocol_version=args.protocol, foundation=args.foundation, iterations=args.iterations,
                   eval_every=args.eval_every, optimizer=args.optimizer, weight_decay=args.weight_decay,
                   device=args.device, seed=args.seed, **overrides)


def main(args) -> int:
    from bench.methods import get_method
    from bench.quiet import show_third_party
    from bench.runner import run
    hparams = dict(_kv(t) for t in args.hp)
    from bench.commands.evaluate import check_retention
    check_retention(args)
    get_method(args.method, **hparams)  # fail fast: unknown names (listing the valid ones), bad values
    if args.augment is not None:
        from bench.augment import get_augmentation
        get_augmentation(args.augment)
    if args.verbose:
        show_third_party()
    if args.params not in ("default", "tuned"):
        raise ValueError("--params takes 'default' or 'tuned'")
    spec = spec_from_args(args, hparams=hparams, lr=args.lr, augment=args.augment)
    if args.params == "tuned":
        from bench.tuning import apply_tuned
        spec = apply_tuned(spec)
    result = run(spec, tracking_uri=args.tracking_uri)
    print_result(result)
    if not args.no_extra_eval:
        from bench.evaluation.extra import describe, evaluate_run
        from pathlib import Path
        out = evaluate_run(Path(result["model_dir"]).parent, retention=args.retention, device=args.device)
        print(f"extra evaluation: {describe(out.get('sets', {}))}" + (f"; not evaluated: {out['why']}"
                                                                       if out.get("why") else ""))
    return 0


def print_result(result: dict) -> None:
    spec = result["spec"]
    augment = f" with {spec['augment']}" if spec.get("augment") else ""
    print(f"\n{spec['method']}{augment} on {spec['dataset']}, {spec['shots']}-shot, repeat {spec['repeat']} "
          f"(protocol {spec['protocol_version']}), {result['evaluated']} cases:")
    labels = result.get("labels", [])      # several labels: a row per (case, label), means per label
    width = max([14] + [len(name) + 2 for name in labels])
    label_head = f"{'label':<{width}}" if labels else ""
    print(f"{'case':<14}{label_head}{'Dice':>8}{'HD95 mm':>10}{'NSD':>8}{'lesion F1':>11}")
    for c in result["cases"]:
        name = f"{c['label']:<{width}}" if labels else ""
        print(f"{c['case_id']:<14}{name}{c['dice']:>8.3f}{c['hd95']:>10.2f}{c['nsd']:>8.3f}{c['lesion_f1']:>11.3f}")
    s = result["summary"]
    for name in labels:
        k = f"label.{name}."
        print(f"{'mean':<14}{name:<{width}}{s[k + 'dice_mean']:>8.3f}{s[k + 'hd95_mean']:>10.2f}"
              f"{s[k + 'nsd_mean']:>8.3f}{s[k + 'lesion_f1_mean']:>11.3f}")
    head = f"{'mean':<14}" + (f"{'(over labels)':<{width}}" if labels else "")
    print(head + f"{s['dice_mean']:>8.3f}{s['hd95_mean']:>10.2f}{s['nsd_mean']:>8.3f}{s['lesion_f1_mean']:>11.3f}")
    p, c = result["params"], result["cost"]
    updated = "" if p.get("updated_per_step") is None else f"; updated per step {p['updated_per_step']:,}"
    print(f"trainable {p['trainable']:,} of {p['total']:,} parameters{updated}; changed {p['changed']:,}; "
          f"train {c['train_seconds']:.1f} s ({'no' if c['step_seconds_median'] is None else format(c['step_seconds_median'], '.3f')} s/step, {c['device']}); "
          f"peak memory {'n/a' if c['peak_memory_mb'] is None else format(c['peak_memory_mb'], '.0f')} MiB "
          f"above the process at start")
    print_provenance(result["provenance"])
    print(f"result: {result['model_dir'].rsplit('/model', 1)[0]}/result.json; MLflow run {result['mlflow_run_id']}")


def print_provenance(prov: dict) -> None:
    f, r, b, code, hp = prov["foundation"], prov["recipe"], prov["budget"], prov["code"], prov["hyperparameters"]
    src = ", ".join(f"{k} {v}" for k, v in r["source"].items())
    print("provenance:")
    rows = [
        ("foundation", f"{f['name']}  sha256 {f['sha256']}"),
        ("protocol", f"{prov['protocol']['dataset']} {prov['protocol']['version']}"),
        ("recipe", f"{r['optimizer_detail']}, lr {r['lr']:g}, weight decay {r['weight_decay']:g}  (source: {src})"),
        ("budget", f"{b['iterations']} forward/backward passes = {b['train_steps']} steps + "
                   f"{b['calibration_passes']} calibration; batch {b['batch_size']}, "
                   f"patch {'x'.join(map(str, b['patch_size']))}"),
        ("seed", f"{prov['seed']['value']}  ({prov['seed']['source']})"),
        ("hyper-parameters", f"{hp['values'] or '-'}  (source: {hp['source']})"),
        ("code", f"bench {code['version']}, git {code['git_commit'] or 'n/a'}"
                 + (" (uncommitted changes)" if code.get("git_dirty") else "")),
        ("packages", ", ".join(f"{k} {v}" for k, v in prov["versions"].items())),
        ("device", f"{prov['device']['type']} ({prov['device']['name']})"),
    ]
    for k, v in rows:
        print(f"  {k:<17}{v}")
