"""Instance types the planner sizes for: accelerator memory, bandwidth, cores and price, as data.

Every figure carries its source and the date it was read. Units are the sources' own: Neuron
device memory and bandwidth are GiB and GiB/s; NVIDIA's GB and GB/s are 1e9 bytes. Prices are
US East (N. Virginia) Linux on-demand USD per hour, as instances.vantage.sh lists them (figures
copied from AWS's price list), read through the github.com/tsaol/aws-gpu data files generated
from it on 2026-01-21; the tutorial's own inf2.xlarge price ($0.7582/h) agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
GB = 10**9
READ_ON = "2026-12-01"

_NEURON_INF2 = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/inf2-arch.html"
_NEURON_INF2_CHIP = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/inferentia2.html"
_NEURON_TRN1 = "https://awsdocs-neuron.readthedocs-hosted.com/en/v2.9.1/_sources/general/arch/neuron-hardware/trn1-arch.rst.txt"
_NEURON_TRN1_CHIP = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/trainium.html"
_PRICES = "https://github.com/tsaol/aws-gpu/blob/77fcd9fe1d0652fd07b830e5ed030d61da87923e/data/{family}_instances.js"
_VANTAGE = "https://instances.vantage.sh/aws/ec2/{name}"
_A10G = "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/"
_A10G_MEASURED = "https://huggingface.co/PrunaAI/TinyLlama-TinyLlama_v1.1_math_code-AWQ-4bit-smashed/blame/88606a0838a3d429297c4e697e40a7c466c248a8/smashed_results.json"
_L4_L40S = "https://grokipedia.com/page/NVIDIA_L4_vs_L40S"
_A100 = "https://glennklockwood.com/garden/processors/A100"
_A100_MEASURED = (
    "https://upb-pc2.atlassian.net/wiki/spaces/PC2DOK/pages/1900609/NVIDIA+A100+40GB+with+NVLINK"
)
_H100 = "https://glennklockwood.com/garden/processors/h100"


@dataclass(frozen=True)
class Source:
    what: str
    url: str
    read_on: str = READ_ON


@dataclass(frozen=True)
class Accelerator:
    """One chip or GPU. Tensor parallelism splits a model across its *units*: NeuronCores on
    Inferentia2/Trainium (two per chip, sharing the chip's memory), whole GPUs on NVIDIA."""

    name: str
    unit: str
    units: int
    memory: int
    """Bytes of device memory per chip/GPU."""
    bandwidth: float | None
    """Device memory bandwidth per chip/GPU, bytes/s; None when not sourced."""
    sources: tuple[Source, ...]

    @property
    def memory_per_unit(self) -> int:
        return self.memory // self.units

    @property
    def bandwidth_per_unit(self) -> float | None:
        return None if self.bandwidth is None else self.bandwidth / self.units


@dataclass(frozen=True)
class Instance:
    name: str
    target: str
    """inf2, trn1, gpu or cpu (``--target``)."""
    accelerator: Accelerator
    count: int
    """Chips or GPUs in the instance (1 for the CPU host itself)."""
    vcpus: int
    host_memory: int
    """Bytes of host RAM."""
    price_per_hour: float | None
    """On-demand USD per hour; None where no price could be confirmed."""
    sources: tuple[Source, ...]

    @property
    def units(self) -> int:
        return self.count * self.accelerator.units


INFERENTIA2 = Accelerator(
    "Inferentia2",
    "NeuronCore-v2",
    units=2,
    memory=32 * GiB,
    bandwidth=820 * GiB,
    sources=(Source("2 NeuronCore-v2 per chip, 32 GiB HBM, 820 GiB/s", _NEURON_INF2_CHIP),),
)
TRAINIUM = Accelerator(
    "Trainium",
    "NeuronCore-v2",
    units=2,
    memory=32 * GiB,
    bandwidth=820 * GiB,
    sources=(
        Source("2 NeuronCore-v2 per chip, 32 GiB device memory, 820 GiB/s", _NEURON_TRN1_CHIP),
    ),
)
A10G = Accelerator(
    "NVIDIA A10G",
    "GPU",
    units=1,
    # NOTE: CUDA reports 22,515.75 MiB in all on an A10G (measured in PrunaAI's results file),
    # less than the 24 GB sold: the measured figure is the one that bounds a model.
    memory=int(22515.75 * (1 << 20)),
    bandwidth=600 * GB,
    sources=(
        Source("24 GB GDDR6, 600 GB/s (same as A10)", _A10G),
        Source("current_gpu_total_memory 22515.75 MiB measured on an A10G", _A10G_MEASURED),
    ),
)
L4 = Accelerator(
    "NVIDIA L4",
    "GPU",
    units=1,
    memory=24 * GB,
    bandwidth=300 * GB,
    sources=(Source("L4: 24 GB GDDR6, 300 GB/s", _L4_L40S),),
)
L40S = Accelerator(
    "NVIDIA L40S",
    "GPU",
    units=1,
    memory=48 * GB,
    bandwidth=864 * GB,
    sources=(Source("L40S: 48 GB GDDR6, 864 GB/s", _L4_L40S),),
)
A100_40GB = Accelerator(
    "NVIDIA A100 40GB SXM4",
    "GPU",
    units=1,
    # deviceQuery's total global memory on an A100 40GB (a measurement, not the label).
    memory=42405855232,
    bandwidth=1555 * GB,
    sources=(
        Source("A100 40G SXM4: 40 GB HBM2, 1.555 TB/s (from NVIDIA's datasheet)", _A100),
        Source("deviceQuery: 42405855232 bytes of global memory", _A100_MEASURED),
    ),
)
H100_80GB = Accelerator(
    "NVIDIA H100 80GB SXM5",
    "GPU",
    units=1,
    memory=80 * GB,
    bandwidth=3350 * GB,
    sources=(Source("H100 SXM5: 80 GB HBM3, 3.35 TB/s (the page marks it '(max)?')", _H100),),
)


def _aws(
    name: str,
    target: str,
    accelerator: Accelerator,
    count: int,
    vcpus: int,
    host_gib: int,
    price: float,
    spec_source: Source,
) -> Instance:
    family = name.split(".")[0]
    price_source = Source(
        f"${price}/h on-demand, us-east-1 Linux (vantage data generated 2026-01-21)",
        _PRICES.format(family=family),
    )
    return Instance(
        name=name,
        target=target,
        accelerator=accelerator,
        count=count,
        vcpus=vcpus,
        host_memory=host_gib * GiB,
        price_per_hour=price,
        sources=(spec_source, price_source, Source("instance page", _VANTAGE.format(name=name))),
    )


_INF2_TABLE = Source("chips, vCPUs, host memory (GiB) per Inf2 size", _NEURON_INF2)
_TRN1_TABLE = Source("chips, vCPUs, host memory (GiB) per Trn1 size", _NEURON_TRN1)
_GPU_TABLE = Source("GPU count, vCPUs, memory (vantage data)", _PRICES)

CATALOGUE: tuple[Instance, ...] = (
    _aws("inf2.xlarge", "inf2", INFERENTIA2, 1, 4, 16, 0.7582, _INF2_TABLE),
    _aws("inf2.8xlarge", "inf2", INFERENTIA2, 1, 32, 128, 1.96786, _INF2_TABLE),
    _aws("inf2.24xlarge", "inf2", INFERENTIA2, 6, 96, 384, 6.49063, _INF2_TABLE),
    _aws("inf2.48xlarge", "inf2", INFERENTIA2, 12, 192, 768, 12.98127, _INF2_TABLE),
    _aws("trn1.2xlarge", "trn1", TRAINIUM, 1, 8, 32, 1.34375, _TRN1_TABLE),
    _aws("trn1.32xlarge", "trn1", TRAINIUM, 16, 128, 512, 21.5, _TRN1_TABLE),
    _aws("g5.xlarge", "gpu", A10G, 1, 4, 16, 1.006, _GPU_TABLE),
    _aws("g5.12xlarge", "gpu", A10G, 4, 48, 192, 5.672, _GPU_TABLE),
    _aws("g5.48xlarge", "gpu", A10G, 8, 192, 768, 16.288, _GPU_TABLE),
    _aws("g6.xlarge", "gpu", L4, 1, 4, 16, 0.8048, _GPU_TABLE),
    _aws("g6.12xlarge", "gpu", L4, 4, 48, 192, 4.6016, _GPU_TABLE),
    _aws("g6.48xlarge", "gpu", L4, 8, 192, 768, 13.3504, _GPU_TABLE),
    _aws("g6e.xlarge", "gpu", L40S, 1, 4, 32, 1.861, _GPU_TABLE),
    _aws("g6e.12xlarge", "gpu", L40S, 4, 48, 384, 10.49264, _GPU_TABLE),
    _aws("g6e.48xlarge", "gpu", L40S, 8, 192, 1536, 30.13118, _GPU_TABLE),
    _aws("p4d.24xlarge", "gpu", A100_40GB, 8, 96, 1152, 21.957642, _GPU_TABLE),
    _aws("p5.4xlarge", "gpu", H100_80GB, 1, 16, 256, 6.88, _GPU_TABLE),
    _aws("p5.48xlarge", "gpu", H100_80GB, 8, 192, 2048, 55.04, _GPU_TABLE),
)
TARGETS = ("inf2", "trn1", "gpu", "cpu")


def local_cpu(memory: int, cpus: int, how: str) -> Instance:
    """The machine kiln runs on, as a ``cpu`` target: its RAM is the memory, no price, and no
    bandwidth figure (none is sourced; kiln's CPU speed is measured by ``kiln bench cpu``)."""
    host = Accelerator("host CPU", "host", 1, memory, None, (Source(how, "local"),))
    return Instance("this machine", "cpu", host, 1, cpus, memory, None, host.sources)
