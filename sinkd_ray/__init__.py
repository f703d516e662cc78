"""sinkd_ray: Sinkhorn knowledge distillation (SinKD) with Ray Train, Ray Tune and MLflow."""

__version__ = "0.1.0"
