"""The diffusion maths, torch and numpy only: EDM preconditioning, loss, schedule,
exact denoisers for known distributions, and the training step."""

from pipeline.diffusion.edm import (
    P_MEAN,
    P_STD,
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    Precond,
    add_noise,
    c_in,
    c_noise,
    c_out,
    c_skip,
    edm_loss,
    karras_sigmas,
    loss_weight,
)

__all__ = [
    "P_MEAN",
    "P_STD",
    "RHO",
    "SIGMA_DATA",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "Precond",
    "add_noise",
    "c_in",
    "c_noise",
    "c_out",
    "c_skip",
    "edm_loss",
    "karras_sigmas",
    "loss_weight",
]
