"""Benchmark loaders, each reading a user's checkout from a path (lacax ships no benchmark data).

  verilog_eval(path, task)   NVlabs/verilog-eval v2: `dataset_spec-to-rtl/` ("spec-to-rtl") and
                             `dataset_code-complete-iccad2023/` ("code-complete"); files `ProbNNN_name_prompt.txt`,
                             `_ref.sv` (module RefModule), `_test.sv` (module tb), `_ifc.txt` (code-complete)
  rtllm(path)                hkust-zhiyao/RTLLM v2.0: `Category/Sub/<design>/` with `design_description.txt`,
                             `testbench.v`, `verified_<name>.v` and data files (folder names may hold spaces)
  logikbench(path=None)      zeroasiccorp logikbench (PyPI): `<group>/<design>/` with README.md, rtl/*.v and a
                             self-checking testbench/test_*_smoke.v (PASSED / FAILED); default: the installed
                             package

Known issues are recorded with their reasons (measured with iverilog 11.0 and verilator 5.006; see
`known_issues` in each loader). They do not change scoring: the harness reports every item's measured outcome
and, beside it, the recorded reason.
"""

from __future__ import annotations

import glob
import os
import re

from lacax.hw.bench.problem import Problem, rename_module

VERILOG_EVAL_TASKS = {"spec-to-rtl": "dataset_spec-to-rtl", "code-complete": "dataset_code-complete-iccad2023"}

VERILOG_EVAL_KNOWN_ISSUES = {
    "Prob099_m2014_q6c": {"*": "benchmark inconsistent at HEAD c498220: the reference's ports are Y1/Y3, the "
                               "testbench connects Y2/Y4"},
    "Prob151_review2015_fsm": {"iverilog": "iverilog 11 does not support the reference's casts (verilator "
                                           "passes it)"},
    "Prob156_review2015_fancytimer": {"iverilog": "iverilog 11 does not support the reference's casts "
                                                  "(verilator passes it)"},
}

RTLLM_KNOWN_ISSUES = {
    "asyn_fifo": {"iverilog": "iverilog 11 does not support the `break` in the testbench"},
    "ring_counter": {"iverilog": "iverilog 11 rejects the testbench's array assignment"},
    "radix2_div": {"*": "the reference fails its own testbench"},
    "clkgenerator": {"*": "the reference fails its own testbench"},
}

_VE_SYSTEM = ("You are a Verilog RTL designer that only writes code using correct Verilog syntax and verifies "
              "the functionality of the design.")


def _read(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def _header(text: str, top: str) -> str:
  m = re.search(rf"\bmodule\s+{re.escape(top)}\b[^;]*;", text, re.DOTALL)
  return m.group(0) if m else f"module {top}();"


def verilog_eval(path: str, task: str = "spec-to-rtl") -> list[Problem]:
  """VerilogEval v2 problems of `task` under `path` (the repository root or the dataset folder itself)."""
  if task not in VERILOG_EVAL_TASKS:
    raise ValueError(f"task={task!r} must be one of {sorted(VERILOG_EVAL_TASKS)}")
  folder = os.path.join(path, VERILOG_EVAL_TASKS[task])
  if not os.path.isdir(folder):
    folder = path
  prompts = sorted(glob.glob(os.path.join(folder, "*_prompt.txt")))
  if not prompts:
    raise FileNotFoundError(f"no VerilogEval v2 *_prompt.txt files under {path!r} (task {task!r}: expected "
                            f"{VERILOG_EVAL_TASKS[task]}/ProbNNN_name_prompt.txt)")
  problems = []
  for prompt_path in prompts:
    task_id = os.path.basename(prompt_path)[:-len("_prompt.txt")]
    base = prompt_path[:-len("_prompt.txt")]
    for suffix in ("_ref.sv", "_test.sv"):
      if not os.path.exists(base + suffix):
        raise FileNotFoundError(f"VerilogEval problem {task_id}: {base + suffix} is missing")
    prompt, ref, test = _read(prompt_path), _read(base + "_ref.sv"), _read(base + "_test.sv")
    reference = rename_module(ref, "RefModule", "TopModule")
    if task == "code-complete":
      ifc_path = base + "_ifc.txt"
      interface = _read(ifc_path).strip() if os.path.exists(ifc_path) else _header(reference, "TopModule")
      mode = "body"
    else:
      interface, mode = _header(reference, "TopModule"), "module"
    problems.append(Problem(
        task_id=task_id, benchmark=f"verilog_eval_v2/{task}", description=prompt.strip(), top="TopModule",
        interface=interface, testbench={"test.sv": test, "ref.sv": ref}, reference=reference, answer_mode=mode,
        design_file="design.sv", sim_top="tb", judge="mismatches",
        known_issues=VERILOG_EVAL_KNOWN_ISSUES.get(task_id, {}),
        meta={"source": os.path.relpath(prompt_path, path), "system": _VE_SYSTEM}))
  return problems


def _rtllm_top(description: str, folder_name: str) -> str:
  m = re.search(r"Module name:\s*([A-Za-z_]\w*)", description)
  return m.group(1) if m else folder_name


def rtllm(path: str) -> list[Problem]:
  """RTLLM v2.0 designs under `path`; each reference `verified_*` module is renamed to the design's name."""
  descs = sorted(glob.glob(os.path.join(path, "**", "design_description.txt"), recursive=True))
  if not descs:
    raise FileNotFoundError(f"no RTLLM design_description.txt under {path!r} (expected <category>/<sub>/<design>/)")
  problems = []
  for desc_path in descs:
    folder = os.path.dirname(desc_path)
    name = os.path.basename(folder)
    description = _read(desc_path)
    top = _rtllm_top(description, name)
    verified = sorted(glob.glob(os.path.join(folder, "verified_*.v")))
    tb_path = os.path.join(folder, "testbench.v")
    if not verified or not os.path.exists(tb_path):
      raise FileNotFoundError(f"RTLLM design {name}: needs testbench.v and verified_*.v in {folder!r}")
    ref = _read(verified[0])
    declared = re.findall(r"\bmodule\s+(verified_\w+)", ref)
    main = f"verified_{top}" if f"verified_{top}" in declared else (declared[0] if declared else None)
    for mod in declared:  # the main module becomes `top`; helper modules lose the prefix
      ref = rename_module(ref, mod, top if mod == main else mod[len("verified_"):])
    data = {}
    for f in sorted(os.listdir(folder)):
      full = os.path.join(folder, f)
      if (os.path.isfile(full) and f not in ("design_description.txt", "testbench.v", "makefile")
          and not f.startswith("verified_")):
        with open(full, "rb") as fh:
          data[f] = fh.read()
    problems.append(Problem(
        task_id=name, benchmark="rtllm_v2", description=description.strip(), top=top,
        interface=_header(ref, top), testbench={"testbench.v": _read(tb_path)}, reference=ref,
        answer_mode="module", design_file=f"{top}.v", sim_top=None, judge="pass_marker", data_files=data,
        known_issues=RTLLM_KNOWN_ISSUES.get(name, {}),
        meta={"source": os.path.relpath(folder, path), "category": os.path.relpath(folder, path).split(os.sep)[0]}))
  return problems


def logikbench_root() -> str:
  import logikbench  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(logikbench.__file__), "benchmarks")


def logikbench(path: str | None = None, groups: tuple[str, ...] = ("basic", "arithmetic", "memory", "blocks")
               ) -> list[Problem]:
  """logikbench designs that have a smoke testbench; the README is the description, rtl/*.v the reference."""
  root = path or logikbench_root()
  problems = []
  for group in groups:
    for folder in sorted(glob.glob(os.path.join(root, group, "*"))):
      name = os.path.basename(folder)
      tbs = sorted(glob.glob(os.path.join(folder, "testbench", "test_*_smoke.v")))
      rtl = sorted(glob.glob(os.path.join(folder, "rtl", "*.v")))
      if not tbs or not rtl:
        continue
      readme = os.path.join(folder, "README.md")
      description = _read(readme) if os.path.exists(readme) else f"The {name} design."
      reference = "\n".join(_read(f) for f in rtl)
      top = name if re.search(rf"\bmodule\s+{re.escape(name)}\b", reference) else (
          re.findall(r"\bmodule\s+(\w+)", reference) or [name])[0]
      problems.append(Problem(
          task_id=f"{group}/{name}", benchmark="logikbench", description=description.strip(), top=top,
          interface=_header(reference, top), testbench={os.path.basename(tbs[0]): _read(tbs[0])},
          reference=reference, answer_mode="module", design_file=f"{top}.v", sim_top=None, judge="pass_marker",
          meta={"group": group}))
  if not problems:
    raise FileNotFoundError(f"no logikbench designs with rtl/*.v and testbench/test_*_smoke.v under {root!r}")
  return problems
