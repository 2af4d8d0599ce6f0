"""What `meshlm doctor` knows about this node before it talks to the others.

The facts every node of a job must agree on (meshlm version and code, torch version, config,
data, backend) and the ones that make it reachable (the interface and address of the
collectives), collected into one JSON-able record that the doctor exchanges between nodes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from meshlm.config import Config
from meshlm.data.index import INDEX_FILE
from meshlm.data.prepare import data_dir_for
from meshlm.data.sources import describe_source
from meshlm.distributed.env import accelerator, read_launch_env, read_network_env
from meshlm.distributed.interfaces import collective_interface


@dataclass
class NodeFacts:
    hostname: str
    meshlm_version: str
    code_hash: str  # the meshlm package's own source files
    code_path: str
    torch_version: str
    python_version: str
    device: str
    backend: str
    interface: str
    address: str
    interface_how: str
    interface_problem: str | None
    config_hash: str
    config: dict = field(repr=False)
    data_dir: str = ""
    data_source: str = ""
    data_fingerprint: str = ""  # "" when the data is not prepared on this node
    probe_port: int = 0  # where this node's doctor accepts reachability probes
    token: str = ""  # what it answers there (so that a probe knows it reached this doctor)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> NodeFacts:
        return NodeFacts(**json.loads(text))

    @property
    def label(self) -> str:
        return f"{self.address or '?'} (host {self.hostname})"


def meshlm_version() -> str:
    try:
        return importlib.metadata.version("meshlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def code_hash() -> tuple[str, Path]:
    """A hash of the meshlm package's .py files (names and contents) and the package's folder:
    two nodes on the same version but different code (a local edit, another commit) differ."""
    root = Path(__file__).resolve().parents[1]  # the meshlm package
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12], root


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(cfg.to_toml().encode()).hexdigest()[:12]


def data_facts(cfg: Config) -> tuple[str, str, str]:
    """(data directory, source identifier, fingerprint of the prepared files or "")."""
    data_dir = data_dir_for(cfg.data, cfg.model.vocab_size)
    index = data_dir / INDEX_FILE
    fingerprint = ""
    if index.is_file():
        try:
            hashes = json.loads(index.read_text()).get("sha256", {})
            fingerprint = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            fingerprint = "unreadable index.json"
    return str(data_dir.resolve()), describe_source(cfg.data.source), fingerprint


def collect_facts(cfg: Config, multi_node: bool) -> NodeFacts:
    env = read_launch_env()
    gpus = accelerator()
    device = f"cuda x{gpus.count} ({gpus.name})" if gpus else "cpu"
    choice = collective_interface(env.backend, read_network_env(), multi_node=multi_node)
    code, root = code_hash()
    data_dir, source, fingerprint = data_facts(cfg)
    return NodeFacts(
        hostname=socket.gethostname(),
        meshlm_version=meshlm_version(),
        code_hash=code,
        code_path=str(root),
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        device=device,
        backend=env.backend,
        interface=choice.name,
        address=choice.address,
        interface_how=choice.how,
        interface_problem=choice.problem,
        config_hash=config_hash(cfg),
        config=cfg.to_dict(),
        data_dir=data_dir,
        data_source=source,
        data_fingerprint=fingerprint,
    )
