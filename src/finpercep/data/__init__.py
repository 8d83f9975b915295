"""The FGR data engine: HR crops -> degraded LR -> SR families -> region swap -> ground-truth maps."""
