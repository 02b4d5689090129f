"""Spec2RTL-Agent (arXiv 2506.13905): specification documents -> verified RTL through role prompts and real tools.

  spec        the spec document format (header, `## Interface`, `## Behaviour`, `## Vectors`), `SpecError`, the
              shipped specs (`specs/<name>/spec.md`: CRC-8/16/32, GCD, 8-tap FIR, ALU)
  roles       the role prompts (Module 1: summarizer, decomposer, describer, verifier; Module 2: the four stage
              coders and the prompt optimiser; Module 3: the error analyser) and the parsing of their answers
  execute     the stage verifiers, each a real run in the sandbox: Python, g++, XLS interpret, XLS codegen +
              iverilog co-simulation + yosys
  agent       the orchestrator: understanding, progressive coding, the 4-path reflection router, the
              human-intervention count (`Agent(backend).run(spec) -> SpecRun`)
  reference   the shipped reference stage outputs, the reference-replaying backend and planted failures

The job is `lacax.jobs.spec2rtl` (`configs/spec2rtl.py`). C++-to-HLS is replaced by DSLX/XLS (no C++ HLS tool
installs offline); see `agent`.
"""
