"""The model registry: numbered versions per model name and aliases (`latest`, `staging`,
`champion`). Registration moves `latest` and `staging` to the new version; `champion`
moves only through promotion: the registry's gate (run by a blocking asset check), or a
person's `crucible models promote/rollback`. One JSON file replaced atomically under a file
lock, and an append-only audit log of every change (who, why), written under the same lock."""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from resources.store.artifact_store import atomic_write_text
from resources.store.home import crucible_home


# A model name is one plain word: no path separators, no `@` or `:` (those select an alias
# or a version in a spec), so no name can address anything but its own registry entry.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"model name {name!r} is not a plain name (letters, digits, _ . -)")
    return name


class ModelRegistry(ConfigurableResource):
    root: str = Field(default="", description="Registry directory; empty means $CRUCIBLE_HOME/registry")

    @property
    def base(self) -> Path:
        return Path(self.root) if self.root else crucible_home() / "registry"

    def _read(self) -> dict:
        path = self.base / "registry.json"
        return json.loads(path.read_text()) if path.exists() else {"models": {}}

    @contextmanager
    def _locked(self):
        """Read-modify-write of registry.json plus the audit lines of that change, all under
        one lock; the registry file is replaced atomically (and left alone when nothing
        changed, as on a cache-hit re-run), and audit lines are appended only after it is, so
        the log never records a change the registry does not hold."""
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.base / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data, events = self._read(), []
            before = json.dumps(data, indent=1, sort_keys=True)
            yield data, events
            if (after := json.dumps(data, indent=1, sort_keys=True)) != before:
                atomic_write_text(self.base / "registry.json", after)
            if events:
                with open(self.base / "audit.jsonl", "a") as f:
                    f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in events))
                    f.flush()
                    os.fsync(f.fileno())

    def audit_log(self) -> list[dict]:
        path = self.base / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def models(self) -> dict:
        return self._read()["models"]

    def find(self, name: str, fingerprint: str) -> dict | None:
        check_name(name)
        model = self.models().get(name, {"versions": []})
        return next((v for v in model["versions"] if v["fingerprint"] == fingerprint), None)

    def register(self, name: str, entry: dict, gate: dict) -> dict:
        """Add a version (idempotent per fingerprint) as `latest` and `staging`. `gate`
        ({metric, lower_is_better, margin}) is what `judge` will require of it to become
        champion."""
        check_name(name)
        with self._locked() as (data, events):
            model = data["models"].setdefault(name, {"versions": [], "aliases": {}})
            existing = next((v for v in model["versions"] if v["fingerprint"] == entry["fingerprint"]), None)
            if existing:
                return existing
            version = {**entry, "version": len(model["versions"]) + 1, "registered_at": time.time(), "gate": gate}
            model["versions"].append(version)
            events.append(_event("register", name, version["version"], "registered by a run", who=f"run {entry.get('run_id')}"))
            for alias in ("latest", "staging"):
                _move(model, alias, version["version"], events, name, "register", "newest registered version",
                      who=f"run {entry.get('run_id')}")
        return version

    def champion_for(self, name: str, eval_report: str) -> dict | None:
        """The champion the version registered from `eval_report` (an eval report's
        fingerprint) is judged against: the one its recorded decision names once it was
        judged (a version is judged once), else the current champion; None when there is
        none. So an eval of that champion on the candidate's set (champion_eval) keeps its
        inputs, and its cache, after the candidate itself became champion."""
        model = self.models().get(check_name(name))
        if model is None:
            return None
        judged = [v["decision"] for v in model["versions"] if v.get("eval_report") == eval_report and "decision" in v]
        number = judged[-1]["champion"] if judged else model["aliases"].get("champion")
        return None if number is None else _version(model, name, number)

    def judge(self, name: str, version: int, who: str, measured: dict | None = None) -> dict:
        """The promotion gate: `version` becomes champion if its gate metric beats the
        current champion's by more than the margin, both measured on one eval set: the
        champion's own report when it was measured on the candidate's set, else `measured`
        (the record of `<recipe>/champion_eval`: the champion evaluated on the candidate's
        set, with `source` naming that artifact). A version is judged once, when first
        checked; later checks report that decision and move nothing (so re-running a cached
        job never undoes a person's rollback)."""
        with self._locked() as (data, events):
            model = _model(data, name)
            entry = _version(model, name, version)
            if "decision" in entry:
                return entry["decision"]
            gate = entry["gate"]
            champion = model["aliases"].get("champion")
            decision = {"candidate": version, "champion": champion, "metric": gate["metric"], "margin": gate["margin"],
                        "candidate_value": entry["metrics"].get(gate["metric"]), "time": time.time()}
            if champion is None:
                decision |= {"passed": True, "reason": f"v{version} is the first version judged; it becomes champion"}
            elif champion == version:  # promoted by hand before its check ran
                decision |= {"passed": True, "reason": f"v{version} is already champion"}
            else:
                decision |= _compare(entry, model["versions"][champion - 1], gate, measured)
            decision["verdict"] = "promoted" if decision["passed"] else decision.get("verdict", "not promoted")
            entry["decision"] = decision
            events.append(_event("judge", name, version, decision["reason"], who=who, passed=decision["passed"]))
            if decision["passed"] and champion != version:
                _move(model, "champion", version, events, name, "promote", decision["reason"], who=who)
        return decision

    def promote(self, spec: str, alias: str, reason: str, who: str | None = None) -> dict:
        """Move `alias` of a model to the version `spec` names, by hand."""
        entry = self.resolve(spec)
        name = spec.split("@")[0].split(":")[0]
        with self._locked() as (data, events):
            model = _model(data, name)
            if model["aliases"].get(_check_alias(alias)) == entry["version"]:
                raise ValueError(f"{name}@{alias} is already v{entry['version']}")
            _move(model, alias, entry["version"], events, name, "promote", reason, who=who)
        return entry

    def rollback(self, name: str, alias: str, reason: str, who: str | None = None) -> int:
        """Move `alias` back to the version it held before its current one (promotions
        stack; a rollback pops one)."""
        check_name(name)
        with self._locked() as (data, events):
            model = _model(data, name)
            stack = _alias_stack(model, _check_alias(alias))
            if len(stack) < 2:
                raise KeyError(f"model {name!r}: alias {alias!r} has no earlier version to roll back to")
            _move(model, alias, stack[-2], events, name, "rollback", reason, who=who)
        return stack[-2]

    def history(self, name: str) -> list[dict]:
        return _model(self._read(), check_name(name)).get("history", [])

    def resolve(self, spec: str) -> dict:
        """`name`, `name@alias` or `name:version` to a version entry."""
        name, alias, number = spec, "latest", None
        if "@" in spec:
            name, alias = spec.split("@", 1)
        elif ":" in spec:
            name, num = spec.split(":", 1)
            if not num.isdigit():
                raise KeyError(f"model spec {spec!r}: version {num!r} is not a number")
            number = int(num)
        check_name(name)
        model = self.models().get(name)
        if model is None:
            raise KeyError(f"no registered model named {name!r} in {self.base}")
        if number is None:
            if alias not in model["aliases"]:
                raise KeyError(f"model {name!r} has no alias {alias!r}")
            number = model["aliases"][alias]
        return _version(model, name, number)


ALIASES = ("latest", "staging", "champion")


def _check_alias(alias: str) -> str:
    if alias not in ALIASES:
        raise KeyError(f"alias {alias!r} is not one of {', '.join(ALIASES)}")
    return alias


def _model(data: dict, name: str) -> dict:
    if name not in data["models"]:
        raise KeyError(f"no registered model named {name!r}")
    return data["models"][name]


def _version(model: dict, name: str, number: int) -> dict:
    if not 1 <= number <= len(model["versions"]):
        raise KeyError(f"model {name!r} has no version {number}")
    return model["versions"][number - 1]


def _compare(candidate: dict, champion: dict, gate: dict, measured: dict | None) -> dict:
    """Like with like only: two values of a metric compare when both were measured on one
    eval set (the same held-out data, eval config and eval code). The champion's value is
    its own report's when that was measured on the candidate's set; otherwise `measured`'s,
    if it is an eval of this champion on the candidate's set; otherwise no verdict, and the
    reason names both sets (and why the champion could not be evaluated on the candidate's)."""
    metric, margin, lower = gate["metric"], gate["margin"], gate["lower_is_better"]
    mine, theirs = candidate.get("eval_set"), champion.get("eval_set")
    new = candidate["metrics"].get(metric)
    if mine == theirs:
        best = champion["metrics"].get(metric)
        source = {"source": "own_eval_report", "version": champion["version"], "fingerprint": champion["fingerprint"]}
        how = ""
    elif _measures(measured, champion, mine) and measured["status"] == "evaluated":
        best, source = measured["champion_value"], {"source": "champion_eval", **measured["source"]}
        how = (f" (v{champion['version']} evaluated on this set by {source['asset']} {source['data_version'][:12]}; its own "
               f"report was on eval set {_short(theirs)})")
    else:
        why = (f"v{champion['version']} could not be evaluated on {_short(mine)}: {measured['reason']}"
               if _measures(measured, champion, mine) else f"no eval of v{champion['version']} on {_short(mine)} was found")
        return {"passed": False, "verdict": "not compared", "champion_value": None, "eval_set": None,
                "eval_sets": {"candidate": mine, "champion": theirs},
                "reason": f"v{candidate['version']} was evaluated on eval set {_short(mine)} and champion "
                          f"v{champion['version']} on {_short(theirs)}, and {why}: their {metric} values do not compare, "
                          "so the champion stays; evaluate both on one set, or promote by hand (crucible models promote)"}
    if new is None or best is None:
        return {"passed": False, "verdict": "not compared", "champion_value": best, "eval_set": mine,
                "champion_value_from": source,
                "reason": f"{metric} missing from v{candidate['version'] if new is None else champion['version']}'s eval report"}
    gain = best - new if lower else new - best
    better = "lower" if lower else "higher"
    verdict = "beats" if gain > margin else "does not beat"
    return {"passed": gain > margin, "champion_value": best, "champion_value_from": source, "improvement": gain,
            "eval_set": mine,
            "reason": f"v{candidate['version']} {verdict} champion v{champion['version']} on {metric} ({better} is better) "
                      f"by more than the margin {margin}: {new:.4f} vs {best:.4f}, improvement {gain:+.4f}"
                      + (f", both on eval set {_short(mine)}" if mine else "") + how}


def _measures(measured: dict | None, champion: dict, eval_set: str | None) -> bool:
    """`measured` is an eval of this very champion (its registered bytes) on `eval_set`."""
    measured_champion = (measured or {}).get("champion") or {}
    return bool(measured) and measured["eval_set"] == eval_set and measured_champion.get("fingerprint") == champion["fingerprint"]


def _short(eval_set: str | None) -> str:
    return eval_set[:12] if eval_set else "(not recorded)"


def _event(event: str, name: str, version: int, reason: str, who: str | None = None, **extra) -> dict:
    return {"time": time.time(), "user": who or getpass.getuser(), "event": event, "model": name,
            "version": version, "reason": reason, **extra}


def _move(model: dict, alias: str, version: int, events: list, name: str, event: str, reason: str, who: str | None = None) -> None:
    """Every alias move goes through here: the model's history and the audit log record it."""
    record = _event(event, name, version, reason, who=who, alias=alias, previous=model["aliases"].get(alias))
    model["aliases"][alias] = version
    model.setdefault("history", []).append(record)
    events.append(record)


def _alias_stack(model: dict, alias: str) -> list[int]:
    stack: list[int] = []
    for record in model.get("history", []):
        if record["alias"] == alias:
            if record["event"] == "rollback":
                stack.pop()
            else:
                stack.append(record["version"])
    return stack
