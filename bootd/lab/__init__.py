"""The network lab: a private namespace, QEMU nodes on taps, and helpers that always clean up."""

from bootd.lab.netns import Lab, LabError, LabProcess, lab_available
from bootd.lab.qemu import QemuError, QemuNode, qemu_available

__all__ = ["Lab", "LabError", "LabProcess", "QemuError", "QemuNode", "lab_available", "qemu_available"]
