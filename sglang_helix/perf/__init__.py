"""Analytic decode performance model and layout planner for Helix vs TP/PP/EP/KVP baselines.

Pure Python + numpy (no torch, except `probe`, which measures this machine):

- `specs`   — model and hardware specs as frozen, validated data (public configs / datasheets).
- `model`   — per-decode-step roofline: KV reads, weight reads + FLOPs, collectives, HOP-B,
              memory feasibility; vectorised over batch sizes.
- `layouts` — enumeration of TP, PP, EP (DP-attention), KVP (Medha-style) and Helix layouts.
- `probe`   — the "cpu" hardware profile of this machine (measured, cached as JSON).
- `search`  — sweeps, Pareto frontiers and the chosen layout with its SGLang launch line (checked
              with the launch rules, sglang_helix.rules).
"""
