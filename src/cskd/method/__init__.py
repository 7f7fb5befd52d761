"""The method (paper sections 3.1-3.3): alignment, CKF schedules, losses, the model adapters and the distiller. Imports only torch, timm and cskd.errors."""
