"""Stage 4, evaluate: offline domain benchmarks (MMLU slices, GSM8K, HumanEval), domain NLL, user task files.

    finescope eval --model default --tasks mmlu:stem,gsm8k,nll:math --limit 20 --out runs/demo/eval/dense

Modules: tasks.py (registry), mc.py (batched log-likelihood), answers.py (answer extraction), code_exec.py
(sandbox, pass@k), perplexity.py (domain NLL), run.py (the stage entry point `run(cfg, out)`), lm_eval_tasks/
(lm-eval YAMLs).
"""
