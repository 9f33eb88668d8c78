"""Scheduler classes this project adds to diffusers' own, built on first use (importing this module imports no
diffusers): LMS without scipy, and ancestral Euler with k-diffusion's eta."""
from __future__ import annotations

import functools


def lms_coefficient(sigmas, step_index: int, order: int, current_order: int) -> float:
    """Linear multistep weight of the derivative `current_order` steps back, for step `step_index`.

    It is the integral, from sigmas[i] to sigmas[i+1], of the Lagrange basis polynomial through
    the last `order` sigmas. That polynomial has degree order-1 (at most 3), so Gauss-Legendre
    quadrature with 4 nodes (exact up to degree 7) gives the exact value without scipy.
    """
    import numpy as np

    sig = [float(s) for s in sigmas]
    i = step_index
    nodes, weights = np.polynomial.legendre.leggauss(4)
    lo, hi = sig[i], sig[i + 1]
    taus = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
    basis = np.ones_like(taus)
    for k in range(order):
        if k == current_order:
            continue
        basis *= (taus - sig[i - k]) / (sig[i - current_order] - sig[i - k])
    return float(0.5 * (hi - lo) * np.sum(weights * basis))


@functools.cache
def scipy_free_lms_scheduler_class():
    """diffusers' LMS sampler for installs without scipy (diffusers ships only a stub there).

    It is EulerDiscreteScheduler (identical timesteps, sigmas, input scaling and noise) with the
    LMS step: the update mixes the last 4 ODE derivatives with weights that diffusers gets from
    scipy.integrate.quad and this class gets exactly from `lms_coefficient`. The class is built on
    first use so that importing this module does not import diffusers.
    """
    import torch
    from diffusers import EulerDiscreteScheduler
    from diffusers.schedulers.scheduling_euler_discrete import (
        EulerDiscreteSchedulerOutput,
    )

    class ScipyFreeLMSDiscreteScheduler(EulerDiscreteScheduler):
        """LMS (k-diffusion's sample_lms, order 4) on top of the Euler discrete schedule."""

        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.derivatives: list[torch.Tensor] = []

        def step(self, model_output, timestep, sample, order: int = 4, return_dict: bool = True):
            if self.step_index is None:
                self._init_step_index(timestep)
            if not hasattr(self, "derivatives"):
                self.derivatives = []
            sigma = self.sigmas[self.step_index]
            prediction = self.config.prediction_type
            if prediction == "epsilon":
                pred_original = sample - sigma * model_output
            elif prediction == "v_prediction":
                pred_original = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
            elif prediction == "sample":
                pred_original = model_output
            else:
                raise ValueError(f"prediction_type {prediction!r} is not supported by LMS")

            derivative = (sample - pred_original) / sigma
            self.derivatives.append(derivative)
            if len(self.derivatives) > order:
                self.derivatives.pop(0)
            order = min(self.step_index + 1, order)
            coeffs = [lms_coefficient(self.sigmas, self.step_index, order, k) for k in range(order)]
            prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
            self._step_index += 1
            if not return_dict:
                return prev_sample, pred_original
            return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)

    return ScipyFreeLMSDiscreteScheduler



@functools.cache
def eta_euler_ancestral_scheduler_class():
    """diffusers' ancestral Euler with k-diffusion's eta: each step adds eta times the ancestral noise
    (sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))) and steps
    the ODE the rest of the way. Eta 1 is the parent class's own step, so it stays diffusers' pixels."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
        EulerAncestralDiscreteSchedulerOutput,
    )
    from diffusers.utils.torch_utils import randn_tensor

    class EtaEulerAncestralDiscreteScheduler(EulerAncestralDiscreteScheduler):
        def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, eta: float = 1.0):
            if eta == 1:
                return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
            if self.step_index is None:
                self._init_step_index(timestep)
            sigma = self.sigmas[self.step_index]
            sample = sample.to(torch.float32)
            if self.config.prediction_type == "epsilon":
                pred_original = sample - sigma * model_output
            elif self.config.prediction_type == "v_prediction":
                pred_original = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
            else:
                raise ValueError(f"prediction_type {self.config.prediction_type!r} is not supported by Euler a")
            sigma_from, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
            full_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
            sigma_up = torch.minimum(sigma_to, eta * full_up)
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            derivative = (sample - pred_original) / sigma
            prev_sample = sample + derivative * (sigma_down - sigma)
            # drawn at every step, as k-diffusion does, so the noise stream does not depend on eta
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
            self._step_index += 1
            if not return_dict:
                return prev_sample, pred_original
            return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)

    return EtaEulerAncestralDiscreteScheduler
