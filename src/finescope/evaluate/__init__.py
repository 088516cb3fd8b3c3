"""Stage 4, evaluate: offline domain benchmarks (MMLU slices, GSM8K, HumanEval), domain NLL, user task files.

    finescope eval --model default --tasks mmlu:stem,gsm8k,nll:math --limit 20 --out runs/demo/eval/dense

Modules: tasks (registry), mc (batched log-likelihood), generate (batched generation, answer extraction),
code_exec (sandbox, pass@k), perplexity (domain NLL), run (the stage), lm_eval_tasks/ (lm-eval YAMLs).
"""
