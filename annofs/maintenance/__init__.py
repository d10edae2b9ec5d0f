"""Store maintenance: consistency checks (fsck) and reclaiming space (gc)."""
