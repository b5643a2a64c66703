"""Parity with the official ``imrnns`` 0.2.3 package, run in its own subprocess.

The official package imports as ``imrnns`` too, so it runs in a child process whose
``imrnns`` is the official folder (installed with ``pip --no-deps --target``). The child
builds a model with random weights, scores random inputs, and saves both its checkpoint (in
its own format) and its outputs; we load that checkpoint and must agree to 1e-5 in fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from imrnns import IMRNN
from imrnns._official import SUBPROCESS_PRELUDE, install_official

pytestmark = pytest.mark.slow

CHILD = SUBPROCESS_PRELUDE + textwrap.dedent(
    """
    from pathlib import Path
    import torch
    from imrnns.model import IMRNN, ModelConfig
    from imrnns.checkpoints import save_checkpoint

    out, seed, n, b, k = Path(sys.argv[1]), *map(int, sys.argv[2:6])
    torch.manual_seed(seed)
    model = IMRNN(ModelConfig(input_dim=n)).eval()
    with torch.no_grad():
        for p in model.parameters():  # random everything: zero biases would hide mistakes
            p.copy_(torch.randn_like(p) * 0.3)
    q, c = torch.randn(b, n), torch.randn(b, k, n)
    with torch.no_grad():
        mq, md, scores, details = model.forward_with_details(q, c)
    save_checkpoint(out / "official.pt", model, {"encoder": "parity-test"})
    torch.save({"q": q, "c": c, "scores": scores, "mq": mq, "md": md,
                "scale": details["aggregate_document_scale"],
                "bias": details["aggregate_document_bias"],
                "qscale": details["query_scale"]}, out / "io.pt")
    """
)


@pytest.fixture(scope="module")
def official_dir():
    return install_official()


@pytest.mark.parametrize(
    ("seed", "n", "b", "k"), [(0, 384, 16, 100), (1, 57, 3, 1), (2, 128, 5, 33)]
)
def test_parity_with_official_v02(tmp_path, official_dir, seed, n, b, k):
    env = {**os.environ, "IMRNNS_OFFICIAL_DIR": str(official_dir)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(seed), str(n), str(b), str(k)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    io = torch.load(tmp_path / "io.pt", weights_only=True)

    model = IMRNN.from_pretrained(tmp_path / "official.pt")
    assert model.config.aggregation == "mean_of_transforms"
    assert (model.config.input_dim, model.config.working_dim) == (n, n)
    with torch.no_grad():
        out = model(io["q"], io["c"])
    diff = float((out.scores - io["scores"]).abs().max())
    assert diff <= 1e-5, f"max |ours - official| = {diff}"
    assert torch.allclose(model.score(io["q"], io["c"]), io["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.modulated_queries, io["mq"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.modulated_documents, io["md"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.document_transform[:, :n], io["scale"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.document_transform[:, n:], io["bias"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.query_transform[:, :n], io["qscale"], atol=1e-5, rtol=0)
