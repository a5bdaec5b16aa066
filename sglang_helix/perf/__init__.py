"""Analytic decode performance model and planner: Helix next to SGLang's --dcp-size (and vLLM's
DCP), plain TP, DP attention, PP and Medha-style KVP, on one roofline.

Pure Python + numpy (no torch, except `probe`, which measures this machine). Modules: specs
(models), hardware (chips, with sources), layouts (families and their enumeration), collectives,
attention (each family's attention side), model (`Setting`, `step`), memory (weights, KV via
kv_size, states, reserve), search (sweeps, frontiers), launch (launch lines + the plugin's rules),
ranking and report (the planner's answer), paper (the paper's six ratios), published (measurements
on real hardware vs predictions), probe (the cpu profile).
"""
