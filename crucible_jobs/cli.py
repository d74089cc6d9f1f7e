"""`crucible` command line: lineage, audit (and reproduction), run comparison, the
registry (listing, promote, rollback), sweeps and garbage collection of the store, read
straight from the artifact store's manifests and the registry (no Dagster instance needed;
a reproduction runs Dagster in a subprocess, a sweep runs its points in this process).
Arguments and printing only: what is printed comes from resources/store/, reproduce.py and
sweeps.py."""

from __future__ import annotations

import argparse
import json
import os
import sys

from crucible_jobs import reproduce
from resources.backends.local.cpu import machine_type
from resources.store import compare, gc, lineage
from resources.store.artifact_store import ArtifactRef, ArtifactStore, IntegrityError
from resources.store.registry import ModelRegistry


def print_tree(node: dict, indent: str = "") -> None:
    if node.get("shown_above"):
        print(f"{indent}{node['key']}  data_version={node['data_version']}  (shown above)")
        return
    print(f"{indent}{node['key']}  data_version={node['data_version']}  code_version={node.get('code_version')}  run={node.get('run_id')}")
    if "path" in node:
        print(f"{indent}    path: {node['path']}")
        print(f"{indent}    config: {json.dumps(node['config'], sort_keys=True)}")
    for u in node["upstream"]:
        print_tree(u, indent + "  ")


def cmd_lineage(args, store, registry) -> int:
    tree = lineage.lineage_tree(store, lineage.resolve(args.target, store, registry))
    if args.json:
        print(json.dumps(tree, indent=1, sort_keys=True))
    else:
        print_tree(tree)
    return 0


def cmd_audit(args, store, registry) -> int:
    ref = lineage.resolve(args.target, store, registry)
    failures = 0
    for node, bad in lineage.audit(store, lineage.lineage_tree(store, ref)):
        if node.get("missing"):
            print(f"MISSING {node['key']} {node['data_version']}")
            failures += 1
            continue
        failures += bool(bad)
        print(f"{'OK     ' if not bad else 'FAILED '}{node['key']} {node['data_version']}" + "".join(f"\n    mismatch: {node['path']}/{f}" for f in bad))
    print("audit passed" if not failures else f"audit failed: {failures} artifact(s) do not match their manifests")
    if args.reproduce:
        return max(1 if failures else 0, print_reproduction(ref, store, args.scratch, args.keep))
    return 1 if failures else 0


def print_reproduction(ref: ArtifactRef, store: ArtifactStore, scratch_dir: str | None, keep: bool) -> int:
    job, chain, scratch = reproduce.plan(ref, store, scratch_dir)
    print(f"re-materializing job {job} ({len(chain)} artifacts) into scratch {scratch}")
    result = reproduce.reproduce_chain(job, chain, scratch, keep)
    for row in result.rows:
        print(f"{row['status'].upper():<15}{row['key']} {row['data_version']}"
              + (f" -> {row['reproduced']}" if row.get("reproduced", row["data_version"]) != row["data_version"] else "")
              + "".join(f"\n    changed: {c}" for c in row.get("changed", []))
              + "".join(f"\n    file differs: {f}" for f in row.get("files", [])))
    first = result.first_difference
    if first is None:
        print(f"reproduce passed: all {len(result.rows)} data versions bit-identical on this machine ({machine_type()}) "
              f"in {result.seconds:.0f} s")
        return 0
    cause = first.get("changed") or first.get("files") or [f"the run stopped before it (log: {result.log})"]
    print(f"reproduce failed: first asset that differs: {first['key']} ({first['status']}): {cause[0]}")
    if not result.ok:
        print(f"the scratch run failed; its log: {result.log}")
    return 1


def decision_text(d: dict) -> str:
    """A promotion decision in one line: verdict, the candidate's and the champion's value of
    the metric, the eval set both were measured on (or the two that did not compare), where
    the champion's value came from, the margin. Decisions recorded before these fields
    existed show what they have."""
    verdict = d.get("verdict") or ("promoted" if d["passed"] else "not promoted")
    if d.get("champion") in (None, d["candidate"]):
        return f"{verdict}: {d['reason']}"

    def shown(v):
        return "n/a" if v is None else f"{v:.4f}"

    text = (f"{verdict}: {d['metric']} {shown(d.get('candidate_value'))} vs champion v{d['champion']} "
            f"{shown(d.get('champion_value'))}, margin {d['margin']}")
    if d.get("eval_set"):
        source = d.get("champion_value_from", {})
        measured = f" (champion measured there by {source['asset']} {source['data_version'][:12]})" \
            if source.get("source") == "champion_eval" else ""
        return text + f", both on eval set {d['eval_set'][:12]}{measured}"
    sets = d.get("eval_sets") or {}
    return text + (f", eval sets differ: {(sets.get('candidate') or '?')[:12]} (candidate) vs {(sets.get('champion') or '?')[:12]}"
                   " (champion)" if sets else "")


def cmd_models(args, store, registry) -> int:
    if args.json:  # per version: its eval set, metrics, aliases and promotion decision (values, shared eval set, verdict)
        print(json.dumps(registry.models(), indent=1, sort_keys=True))
        return 0
    for name, model in sorted(registry.models().items()):
        aliases = {}
        for alias, v in model["aliases"].items():
            aliases.setdefault(v, []).append(alias)
        print(name)
        for v in model["versions"]:
            metric = v.get("gate", {}).get("metric", "test/nll")
            value = v["metrics"].get(metric)
            tag = ",".join(sorted(aliases.get(v["version"], [])))
            decision = v.get("decision")
            verdict = "" if decision is None else f"  gate: {'passed' if decision['passed'] else 'failed'}"
            eval_set = f"  eval_set={v['eval_set'][:12]}" if v.get("eval_set") else ""
            print(f"  v{v['version']:<3} {tag:<24} {metric}={value if value is None else round(value, 4)}{verdict}"
                  f"{eval_set}  data_version={v['content_hash']}  run={v['run_id']}")
            if decision is not None:
                print(f"        decision: {decision_text(decision)}")
    return 0


def cmd_promote(args, store, registry) -> int:
    entry = registry.promote(args.spec, args.alias, args.reason, who=args.by)
    print(f"{args.alias} -> {args.spec.split('@')[0].split(':')[0]} v{entry['version']}")
    return 0


def cmd_rollback(args, store, registry) -> int:
    version = registry.rollback(args.name, args.alias, args.reason, who=args.by)
    print(f"{args.alias} -> {args.name} v{version}")
    return 0


def cmd_compare(args, store, registry) -> int:
    a, b = registry.resolve(args.a), registry.resolve(args.b)
    print(f"{'metric':<32}{args.a:>14}{args.b:>14}{'b - a':>12}  95% CI of b - a")
    for metric, va, vb, ci in compare.metric_differences(a, b):
        ci_text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
        print(f"{metric:<32}{va:>14.4f}{vb:>14.4f}{vb - va:>+12.4f}  {ci_text}")
    changes = compare.config_changes(store, a, b)
    print("\nconfig diff (asset.field: a -> b; a model's own stages without its recipe prefix):" if changes else "\nconfigs identical")
    for path, va, vb in changes:
        print(f"  {path.lstrip('.')}: {va!r} -> {vb!r}")
    for path, va, vb in compare.data_changes(a, b):
        print(f"  data {path.lstrip('.')}: {va} -> {vb}")
    return 0


def cmd_gc(args, store, registry) -> int:
    try:
        report = gc.collect(store, registry, dry_run=args.dry_run)
    except gc.GcRefused as e:
        print(f"crucible gc: {e}", file=sys.stderr)
        return 2
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{report.live_manifests} live manifests, "
          f"{report.live_objects} live objects in {store.base}")
    for item in report.garbage:
        print(f"{verb:<13}{item.kind:<9}{item.size:>15,} B  {item.path}")
    for item in report.kept:
        print(f"{'kept':<13}{item.kind:<9}{item.size:>15,} B  {item.path}  ({item.note})")
    if report.building and args.dry_run:
        print(f"a build is in progress ({', '.join(report.building)}): gc without --dry-run refuses until it ends")
    total = f"{report.total:,} bytes in {len(report.garbage)} entries"
    print(f"{'would free' if args.dry_run else 'freed'} {total}" if report.garbage else "nothing to collect")
    return 0


def cmd_sweep_run(args, store, registry) -> int:
    from crucible_jobs import sweeps  # Dagster and the recipes load only for a sweep, not for every command

    return sweeps.run(args.spec, args.launch, args.module, args.parallel, tuple(args.config))


def cmd_sweep_report(args, store, registry) -> int:
    from crucible_jobs import sweeps

    return sweeps.print_report(args.name, args.json)


def cmd_sweep_register(args, store, registry) -> int:
    from crucible_jobs import sweeps

    return sweeps.register(args.name, args.point)


def cmd_serve(args, store, registry) -> int:
    from crucible_jobs.serving import server  # torch and the web stack load only to serve

    try:
        server.serve(args.model, args.host, args.port, precision=args.precision, threads=args.threads, max_rows=args.max_batch,
                     max_tokens=args.max_tokens, poll_seconds=args.poll_seconds, registry=registry, store=store)
    except (FileNotFoundError, IntegrityError) as e:  # the store, not the command: a supervisor may retry (exit 1)
        print(f"crucible: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crucible", description="Lineage, audits and the model registry of a Crucible store ($CRUCIBLE_HOME).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lineage", help="upstream tree of an asset or registered model")
    p.add_argument("target", help="asset key (sl_basic/registered_model) or model (sl_basic, sl_basic@champion, sl_basic:1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_lineage)
    p = sub.add_parser("audit", help="re-hash every artifact in the lineage against its manifest")
    p.add_argument("target")
    p.add_argument("--reproduce", action="store_true",
                   help="also re-materialize the whole chain into a scratch store and compare data versions")
    p.add_argument("--scratch", help="scratch directory (default: a new temp dir, removed when the reproduction passes)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory after a passing reproduction")
    p.set_defaults(fn=cmd_audit)
    p = sub.add_parser("models", help="registry versions and aliases; promote/rollback move an alias by hand")
    p.add_argument("--json", action="store_true", help="every version with its eval set, metrics and promotion decision "
                                                     "(candidate and champion value, the eval set they share, margin, verdict)")
    p.set_defaults(fn=cmd_models)
    moves = p.add_subparsers(dest="move")
    for move, target, fn in (("promote", "spec", cmd_promote), ("rollback", "name", cmd_rollback)):
        m = moves.add_parser(move, help=f"{move} an alias (recorded in the registry's audit log)")
        m.add_argument(target, help="model version (sl_basic:2, sl_basic@staging)" if target == "spec" else "model name")
        m.add_argument("--reason", required=True, help="why (recorded)")
        m.add_argument("--alias", default="champion", help="alias to move (champion, staging, latest)")
        m.add_argument("--by", default=None, help="who (default: the current user)")
        m.set_defaults(fn=fn)
    p = sub.add_parser("compare", help="two registered models: metrics side by side with the difference and its CI; config diff")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("gc", help="delete store objects and manifests that no ref or registry version reaches "
                                  "(unchanged for an hour); --dry-run only lists them")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted (kind, bytes, path) and the total")
    p.set_defaults(fn=cmd_gc)
    p = sub.add_parser("sweep", help="many runs of one recipe as one cached, compared experiment (docs/recipes.md#sweeps)")
    actions = p.add_subparsers(dest="action", required=True)
    m = actions.add_parser("run", help="check a sweep spec, then train and evaluate every point not cached yet and report")
    m.add_argument("spec", help="sweep spec YAML (examples/sweep_sl_basic.yaml)")
    m.add_argument("--launch", action="store_true", help="submit the points as a backfill to the Dagster instance's "
                                                         "queue instead of running them here")
    m.add_argument("--module", default="crucible_jobs", help="the code location whose sweep job runs the points "
                                                             "(deploy.celery.definitions: on the Celery workers)")
    m.add_argument("--parallel", type=lambda v: max(1, int(v)), default=1, help="points run at once (each its own `dagster job execute`)")
    m.add_argument("-c", "--config", action="append", default=[], help="run config laid over every point's "
                                                                       "(deploy/celery/celery.yaml: the executor's)")
    m.set_defaults(fn=cmd_sweep_run)
    m = actions.add_parser("report", help="a sweep's stored report: points, configurations across seeds, the best one")
    m.add_argument("name", help="the sweep's name (its spec's `name:`)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_sweep_report)
    m = actions.add_parser("register", help="register a point (default: the best configuration at the first seed) "
                                            "through the recipe's own gate and promotion check; no retraining")
    m.add_argument("name")
    m.add_argument("--point", help="a point's full name (see the report)")
    m.set_defaults(fn=cmd_sweep_register)
    p = sub.add_parser("serve", help="an OpenAI-compatible server for a registered model, following its alias "
                                     "(docs/serving.md)")
    p.add_argument("model", help="sl_basic (its champion), sl_basic@staging, or a pinned version sl_basic:3")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on a GPU that has it; on a CPU the faster one, measured once per machine")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: one per core)")
    p.add_argument("--max-batch", type=int, default=64, help="most rows (choices) decoded together")
    p.add_argument("--max-tokens", type=int, default=256, help="completion length when a request names none")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="how often the registry is checked for a moved alias")
    p.set_defaults(fn=cmd_serve)
    args = parser.parse_args(argv)
    try:
        return args.fn(args, ArtifactStore(), ModelRegistry())
    except (KeyError, ValueError, FileNotFoundError, IntegrityError) as e:
        print(f"crucible: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `crucible lineage ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
