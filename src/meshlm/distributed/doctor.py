"""`meshlm doctor --rdzv HOST:PORT --nnodes N [--config ...] [--set ...]`: a preflight for a
multi-node job, run on every node before torchrun.

Each node checks what it can alone (the rendezvous endpoint answers, or this node can serve it
on a free port; the interface and address gloo/NCCL will use; the device and backend), then
the nodes meet at the endpoint (doctor_exchange.py) and compare what must be equal everywhere:
meshlm version and code, torch version, the resolved config (hash, and the keys that differ),
the prepared data (fingerprint), the backend; and every node tries to reach every other node
on the address its collectives will advertise. Every problem is one paragraph naming the
node(s) and the fix; the exit code is 0 when there is none, 1 otherwise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meshlm.config import ConfigError, load_config
from meshlm.distributed.doctor_exchange import (
    DoctorProblem,
    Exchanged,
    ProbeListener,
    exchange,
    open_store,
    parse_endpoint,
)
from meshlm.distributed.doctor_facts import NodeFacts, collect_facts


@dataclass
class DoctorReport:
    facts: NodeFacts
    nodes: list[NodeFacts] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _groups(nodes: list[NodeFacts], key: Callable[[NodeFacts], object]) -> dict[object, list[NodeFacts]]:
    groups: dict[object, list[NodeFacts]] = {}
    for n in nodes:
        groups.setdefault(key(n), []).append(n)
    return groups


def _on(nodes: list[NodeFacts]) -> str:
    return ", ".join(n.label for n in nodes)


def compare(nodes: list[NodeFacts], reach: dict[int, list]) -> tuple[list[str], list[str]]:
    """(problems, notes) of the nodes' facts and reachability."""
    problems, notes = [], []
    for n in nodes:
        if n.interface_problem:
            problems.append(f"node {n.label}: {n.interface_problem}")
    versions = _groups(nodes, lambda n: (n.meshlm_version, n.code_hash))
    if len(versions) > 1:
        found = "; ".join(
            f"meshlm {v} (code {c}, {group[0].code_path}) on {_on(group)}" for (v, c), group in versions.items()
        )
        problems.append(
            f"the nodes run different meshlm: {found}. Ranks on different code can disagree on anything from "
            f"the model's layout to the checkpoint format; install the same meshlm on every node (the same wheel, "
            f"or the same commit of one checkout on shared storage)."
        )
    torches = _groups(nodes, lambda n: n.torch_version)
    if len(torches) > 1:
        found = "; ".join(f"torch {v} on {_on(group)}" for v, group in torches.items())
        problems.append(
            f"the nodes run different torch versions: {found}. Collectives and checkpoints across torch versions "
            f"are not guaranteed to work; install the same torch on every node."
        )
    configs = _groups(nodes, lambda n: n.config_hash)
    if len(configs) > 1:
        flat = [_flatten(n.config) for n in nodes]
        differing = sorted(k for k in flat[0].keys() | set().union(*flat) if len({repr(f.get(k)) for f in flat}) > 1)
        shown = "; ".join(
            f"{k} is " + ", ".join(f"{flat[i].get(k)!r} on {n.label}" for i, n in enumerate(nodes))
            for k in differing[:5]
        )
        problems.append(
            f"the resolved configs differ between nodes (config hash "
            f"{', '.join(f'{h} on {_on(g)}' for h, g in configs.items())}): {shown}"
            f"{f' (and {len(differing) - 5} more keys)' if len(differing) > 5 else ''}. Every node must start "
            f"from the same --config file and the same --set overrides."
        )
    prepared = [n for n in nodes if n.data_fingerprint]
    fingerprints = _groups(prepared, lambda n: n.data_fingerprint)
    if len(fingerprints) > 1:
        found = "; ".join(f"{fp} ({g[0].data_dir}) on {_on(g)}" for fp, g in fingerprints.items())
        problems.append(
            f"the prepared data differs between nodes: {found}. The ranks would train on different tokens. Put "
            f"the data directory on storage every node shares (data.dir or data.cache_dir), or delete the "
            f"stale copies and prepare it once with `meshlm data prepare` and copy it everywhere."
        )
    missing = [n for n in nodes if not n.data_fingerprint]
    if missing and prepared:
        notes.append(
            f"the data is not prepared on {_on(missing)} (at {missing[0].data_dir}); those nodes will prepare it "
            f"themselves from {missing[0].data_source} when the job starts (the same tokens only if the source is "
            f"the same there). A directory on shared storage avoids the question."
        )
    sources = _groups(missing, lambda n: n.data_source)
    if not prepared and len(sources) > 1:
        problems.append(
            f"the nodes would prepare the data from different sources: "
            f"{'; '.join(f'{s} on {_on(g)}' for s, g in sources.items())}. Use the same data.source everywhere "
            f"(python-stdlib depends on each node's Python version), or prepare the data once on shared storage."
        )
    backends = _groups(nodes, lambda n: (n.backend, n.device))
    if len({b for b, _ in backends}) > 1:
        problems.append(
            "the nodes would use different backends: "
            + "; ".join(f"{b} on {d} on {_on(g)}" for (b, d), g in backends.items())
            + ". One job needs one backend: give every node the same devices (NCCL on GPUs), or set "
            "MESHLM_DEVICE=cpu on every node (gloo)."
        )
    for source, results in sorted(reach.items()):
        for target, reached, how in results:
            if not reached:
                problems.append(
                    f"node {nodes[source].label} cannot reach node {nodes[target].label} on the address its "
                    f"collectives will use ({how}). Every rank connects to every other: fix the interface "
                    f"choice (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), the routes or the firewall between them."
                )
    return problems, notes


def run_doctor(
    endpoint: str, nnodes: int, cfg, timeout_s: float = 60.0, log: Callable[[str], None] = print
) -> DoctorReport:
    """Check this node, meet the other nodes' doctors at `endpoint`, compare."""
    if nnodes < 1:
        raise ConfigError(f"--nnodes must be at least 1, got {nnodes}.")
    host, port = parse_endpoint(endpoint)
    deadline = time.monotonic() + timeout_s
    facts = collect_facts(cfg, multi_node=nnodes > 1)
    report = DoctorReport(facts)
    log(f"meshlm doctor on {facts.label}: {nnodes} node(s) expected at {host}:{port}")
    log(
        f"  meshlm {facts.meshlm_version} (code {facts.code_hash}), torch {facts.torch_version}, "
        f"python {facts.python_version}"
    )
    log(f"  device {facts.device}, backend {facts.backend}")
    log(f"  {facts.backend} interface {facts.interface or '-'} {facts.address or '-'} ({facts.interface_how})")
    log(
        f"  config hash {facts.config_hash}; data {facts.data_dir}: "
        + (f"fingerprint {facts.data_fingerprint}" if facts.data_fingerprint else "not prepared here")
    )
    listener = None
    try:
        if facts.address:
            try:
                listener = ProbeListener(facts.address)
                facts.probe_port, facts.token = listener.port, listener.token
                log(f"  ports: a free port binds on {facts.address} ({listener.port})")
            except OSError as e:
                report.problems.append(
                    f"no port can be bound on {facts.address} ({e.strerror or e}): the collectives could not "
                    f"listen there. Free some ports or check the interface."
                )
        store, hosting = open_store(host, port, deadline)
        log(f"  rendezvous {host}:{port}: " + (f"served by this node (port {port} is free)" if hosting else "answers"))
        met: Exchanged = exchange(store, hosting, facts, nnodes, deadline)
        report.nodes = met.nodes
        problems, notes = compare(met.nodes, met.reach)
        report.problems += problems
        report.notes += notes
    except DoctorProblem as e:
        report.problems.append(str(e))
        if facts.interface_problem:
            report.problems.append(f"node {facts.label}: {facts.interface_problem}")
    finally:
        if listener is not None:
            listener.close()
    _print_report(report, nnodes, endpoint, log)
    return report


def _print_report(report: DoctorReport, nnodes: int, endpoint: str, log: Callable[[str], None]) -> None:
    if report.nodes:
        log(f"nodes ({len(report.nodes)} of {nnodes}):")
        for n in report.nodes:
            log(
                f"  {n.label}: meshlm {n.meshlm_version} ({n.code_hash}), torch {n.torch_version}, {n.device}/"
                f"{n.backend} on {n.interface or '-'} {n.address or '-'}, config {n.config_hash}, data "
                f"{n.data_fingerprint or 'not prepared'}"
            )
    for note in report.notes:
        log(f"note: {note}")
    if report.ok:
        log(
            f"ok: every check passed. Start the job on every node with the same command, e.g. torchrun "
            f"--nnodes {nnodes} --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint {endpoint} -m meshlm "
            f"train ..."
        )
        return
    log(f"{len(report.problems)} problem(s):")
    for problem in report.problems:
        log(f"- {problem}")


# ----------------------------------------------------------------------------- CLI


def add_commands(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="preflight for a multi-node job: run it on every node (same --rdzv and --nnodes) before torchrun",
    )
    p.add_argument("--rdzv", required=True, metavar="HOST:PORT", help="the rendezvous endpoint of the job")
    p.add_argument("--nnodes", type=int, required=True, help="number of nodes of the job")
    p.add_argument("--config", "-c", default=None, help="the job's config (TOML file or built-in name)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="the job's config overrides; repeatable",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the other nodes (default 60)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    report = run_doctor(args.rdzv, args.nnodes, cfg, args.timeout)
    return 0 if report.ok else 1
