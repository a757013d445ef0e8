"""The benchmark's tasks, one module per family. Each task is a function (bench, res) that builds its contenders
with the Bench helpers, runs them and fills `res` with ratios, checks, targets and notes."""

from tasks.adddiff import adddiff_mem, adddiff_save
from tasks.cosine import cosineA
from tasks.remerge import remerge
from tasks.sdxl import sdxl
from tasks.smooth import smoothadd
from tasks.traindiff import traindiff
from tasks.ws import ws_mem, ws_save

TASKS = ("ws_mem", "ws_save", "adddiff_mem", "adddiff_save", "traindiff", "cosineA", "smoothadd", "remerge", "sdxl")
ALIASES = {"adddiff": ("adddiff_mem", "adddiff_save"), "all": TASKS}
TITLES = {
    "ws_mem": "Weight sum, 26 block weights, in memory (SD1.5)",
    "ws_save": "Weight sum, 26 block weights, merge and save (SD1.5)",
    "adddiff_mem": "Add difference, in memory (SD1.5)",
    "adddiff_save": "Add difference, merge and save (SD1.5)",
    "traindiff": "trainDifference, in memory (SD1.5)",
    "cosineA": "cosineA, in memory (SD1.5)",
    "smoothadd": "smoothAdd, in memory (SD1.5)",
    "remerge": "One-block re-merge after a full merge, into A's loaded tensors (SD1.5)",
    "sdxl": "SDXL three-model Add difference, streamed to a file",
}
RUNS = {
    "ws_mem": ws_mem,
    "ws_save": ws_save,
    "adddiff_mem": adddiff_mem,
    "adddiff_save": adddiff_save,
    "traindiff": traindiff,
    "cosineA": cosineA,
    "smoothadd": smoothadd,
    "remerge": remerge,
    "sdxl": sdxl,
}
