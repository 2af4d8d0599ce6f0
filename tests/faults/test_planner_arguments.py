"""The planner validates its arguments and cluster files like the config (item 8)."""

from __future__ import annotations

import pytest

from meshlm.cli import main

CLUSTER = 'nodes = 2\ndevices_per_node = 8\n[device]\npreset = "h100-sxm"\n'


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--global-batch", "0", "--seq-len", "512"], "--global-batch must be a positive integer, got 0"),
        (["--global-batch", "64", "--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
        (["--global-batch", "-8", "--seq-len", "512"], "--global-batch must be a positive integer, got -8"),
    ],
)
def test_workload_arguments(args, expected, capsys):
    assert main(["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "data.seq_len" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "links, expected",
    [
        (
            "[intra]\nbandwidth_gbps = 0\n[inter]\nbandwidth_gbps = 50\n",
            "'intra.bandwidth_gbps' must be greater than 0",
        ),
        ("[intra]\nbandwidth_gbps = 450\n[inter]\nbandwidth_gbps = nan\n", "'inter.bandwidth_gbps' expects a finite"),
        ("[intra]\nlatency_us = 3\n[inter]\nbandwidth_gbps = 50\n", "[intra] has no bandwidth_gbps"),
        ("[intra]\nbandwidth_gbps = 450\n", "no [inter] section"),
        ("[intra]\nbandwidth_gbps = 450\nefficiency = 1.5\n[inter]\nbandwidth_gbps = 50\n", "must be in (0, 1]"),
    ],
)
def test_cluster_files(links, expected, tmp_path, capsys):
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER + links)
    argv = ["plan", "--model", "llama3-8b", "--cluster", str(path), "--global-batch", "64", "--seq-len", "512"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "ZeroDivisionError" not in err and "Traceback" not in err


def test_a_single_node_file_needs_no_inter_link_until_nodes_are_added(tmp_path, capsys):
    path = tmp_path / "one-node.toml"
    path.write_text('nodes = 1\ndevices_per_node = 8\n[device]\npreset = "h100-sxm"\n[intra]\nbandwidth_gbps = 450\n')
    argv = ["plan", "--model", "llama3-8b", "--cluster", str(path), "--global-batch", "64", "--seq-len", "512"]
    assert main([*argv, "--top", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--nodes", "2"]) == 2
    assert "no [inter] section" in capsys.readouterr().err
