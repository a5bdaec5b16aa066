"""PD disaggregation and Helix: Helix serves the decode side over mooncake; its pools back a
retracted request up per KVP rank (`cpu_tensor`, srt.memory.retraction). The rest is refused
with the flag and the fix."""

from __future__ import annotations

from .refusal import refuse
from .server import ServerLayout

PD_BACKENDS = ("mooncake", "mooncake_tcp")
# The retraction backup Helix pools support (and declare under PD decode when none is given):
# each KVP rank copies its own pages to host memory and restores them.
HELIX_RETRACTION_BACKUP = "cpu_tensor"


def pd_mode(server: ServerLayout) -> str:
    """--disaggregation-mode as a string: "null" (no PD), "prefill" or "decode"."""
    return str(server.disaggregation_mode or "null")


def check_pd(server: ServerLayout) -> None:
    """Refuse a PD role, transfer backend or host-side KV path Helix does not serve."""
    mode = pd_mode(server)
    if mode == "null":
        return
    if mode == "prefill":
        refuse("--disaggregation-mode prefill: Helix shards decode attention; start the prefill "
               "server without --enable-helix (it feeds a Helix decode server as is) and put "
               "--enable-helix on the --disaggregation-mode decode server")
    backend = str(server.disaggregation_transfer_backend)
    if backend not in PD_BACKENDS:
        refuse(f"--disaggregation-transfer-backend {backend}: the Helix relayout (each KVP rank "
               "receives only its pages) is implemented for mooncake; use "
               "--disaggregation-transfer-backend mooncake (or mooncake_tcp)")
    if server.disaggregation_decode_enable_offload_kvcache:
        refuse("--disaggregation-decode-enable-offload-kvcache copies KV by loc into a host pool; "
               "drop it")
    if float(server.disaggregation_decode_host_receive_threshold or 1) < 1:
        refuse("--disaggregation-decode-host-receive-threshold < 1 receives KV into a host pool; "
               "leave it at 1")
    backup = server.disaggregation_decode_retraction_backup
    if backup not in (None, "none", HELIX_RETRACTION_BACKUP):
        refuse(f"--disaggregation-decode-retraction-backup {backup} mirrors a retracted request's "
               "KV into a HiCache host pool by loc, which Helix pools (1/KVP of the pages per rank) "
               "do not support; use --disaggregation-decode-retraction-backup "
               f"{HELIX_RETRACTION_BACKUP} (the Helix default: each KVP rank backs up and restores "
               "its own pages) or none (a retracted request gets 503)")


def helix_retraction_backup(server: ServerLayout) -> str | None:
    """The retraction backup Helix declares for a PD decode server that names none (SGLang alone
    would pick host_pool for an MHA pool on GPU), else None (the given value stands)."""
    if pd_mode(server) == "decode" and server.disaggregation_decode_retraction_backup is None:
        return HELIX_RETRACTION_BACKUP
    return None
