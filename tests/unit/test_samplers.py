"""Sampler names resolve like A1111's and build the diffusers schedulers contract section 6 names."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from modules.core import samplers, scheduler_classes
from modules.core.samplers import UnknownSamplerError, make_scheduler, resolve

# Stable Diffusion 1.5's scheduler_config.json, as a literal so the test needs no model files.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
}

BRIEF_SAMPLERS = [
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
    "DDIM", "PLMS", "UniPC", "LCM",
]


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("Euler a", None, ("Euler a", "Automatic")),
        ("euler A", None, ("Euler a", "Automatic")),
        ("  Euler   a ", None, ("Euler a", "Automatic")),
        ("k_euler_a", None, ("Euler a", "Automatic")),
        ("k_euler_ancestral", None, ("Euler a", "Automatic")),
        ("k_euler", None, ("Euler", "Automatic")),
        ("k_lms", None, ("LMS", "Automatic")),
        ("k_heun", None, ("Heun", "Automatic")),
        ("k_dpm_2", None, ("DPM2", "Automatic")),
        ("k_dpm_2_a", None, ("DPM2 a", "Automatic")),
        ("k_dpmpp_2m", None, ("DPM++ 2M", "Automatic")),
        ("k_dpmpp_sde", None, ("DPM++ SDE", "Automatic")),
        ("k_dpmpp_2m_sde", None, ("DPM++ 2M SDE", "Automatic")),
        ("ddim", None, ("DDIM", "Automatic")),
        ("PLMS", None, ("PLMS", "Automatic")),
        ("unipc", None, ("UniPC", "Automatic")),
        ("k_lcm", None, ("LCM", "Automatic")),
        # pre-1.9 combined names
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("dpm++ 2m karras", None, ("DPM++ 2M", "Karras")),
        ("DPM++ SDE Karras", None, ("DPM++ SDE", "Karras")),
        ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "Karras")),
        ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 2M SDE Heun Karras", None, ("DPM++ 2M SDE Heun", "Karras")),
        ("DPM++ 3M SDE Exponential", None, ("DPM++ 3M SDE", "Exponential")),
        ("LMS Karras", None, ("LMS", "Karras")),
        ("DPM2 Karras", None, ("DPM2", "Karras")),
        ("DPM2 a Karras", None, ("DPM2 a", "Karras")),
        ("Euler SGM Uniform", None, ("Euler", "SGM Uniform")),
        ("Euler SGMUniform", None, ("Euler", "SGM Uniform")),
        ("Euler Uniform", None, ("Euler", "Uniform")),
        ("UniPC Beta", None, ("UniPC", "Beta")),
        ("k_dpmpp_2m_ka", None, ("DPM++ 2M", "Karras")),
        ("k_dpmpp_sde_ka", None, ("DPM++ SDE", "Karras")),
        ("k_dpmpp_2m_sde_ka", None, ("DPM++ 2M SDE", "Karras")),
        ("k_dpmpp_2m_sde_exp", None, ("DPM++ 2M SDE", "Exponential")),
        ("k_lms_ka", None, ("LMS", "Karras")),
        ("k_dpm_2_ka", None, ("DPM2", "Karras")),
        ("k_dpm_2_a_ka", None, ("DPM2 a", "Karras")),
        # explicit schedule types, in any spelling
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", "karras", ("DPM++ 2M", "Karras")),
        ("Euler", "sgm_uniform", ("Euler", "SGM Uniform")),
        ("Euler", "SGMUniform", ("Euler", "SGM Uniform")),
        ("Euler", "automatic", ("Euler", "Automatic")),
        ("Euler", "", ("Euler", "Automatic")),
        # an explicit non-Automatic type wins over the legacy name's; Automatic does not
        ("DPM++ 2M Karras", "Exponential", ("DPM++ 2M", "Exponential")),
        ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
        ("k_dpmpp_2m_sde_exp", "Uniform", ("DPM++ 2M SDE", "Uniform")),
    ],
)
def test_resolve_table(sampler, scheduler, expected):
    assert resolve(sampler, scheduler) == expected


def test_empty_sampler_takes_the_callers_default():
    assert resolve(None) == ("Euler", "Automatic")
    assert resolve("") == ("Euler", "Automatic")
    assert resolve(None, default=samplers.DEFAULT_UI_SAMPLER) == ("DPM++ 2M", "Automatic")
    assert resolve("  ", "Karras", default="DPM++ 2M") == ("DPM++ 2M", "Karras")


def test_defaults_are_a1111s():
    assert samplers.DEFAULT_UI_SAMPLER == "DPM++ 2M"
    assert samplers.DEFAULT_API_SAMPLER == "Euler"


@pytest.mark.parametrize("name", ["Euler b", "DPM++ 4M", "k_euler_b", "Karras", "DPM fast", "Euler Karras Karras"])
def test_unknown_sampler_raises_with_the_valid_names(name):
    with pytest.raises(UnknownSamplerError) as info:
        resolve(name)
    message = str(info.value)
    assert repr(name) in message
    for valid in BRIEF_SAMPLERS:
        assert valid in message
    assert isinstance(info.value, ValueError)


def test_unknown_schedule_type_raises_with_the_valid_labels():
    with pytest.raises(UnknownSamplerError) as info:
        resolve("Euler", "Polyexponential")
    assert "'Polyexponential'" in str(info.value)
    assert "Karras" in str(info.value) and "SGM Uniform" in str(info.value)


def test_every_sampler_the_brief_names_exists_with_its_a1111_aliases():
    names = samplers.sampler_names()
    for name in BRIEF_SAMPLERS:
        assert name in names
    aliases = {s.name: s.aliases for s in samplers.SAMPLERS}
    assert aliases["Euler a"] == ["k_euler_a", "k_euler_ancestral"]
    assert aliases["DPM++ 2M"] == ["k_dpmpp_2m"]
    assert aliases["DPM2 a"] == ["k_dpm_2_a"]
    assert samplers.schedule_type_labels() == ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "Beta"]
    assert [s.name for s in samplers.SCHEDULE_TYPES] == [
        "automatic", "uniform", "karras", "exponential", "sgm_uniform", "beta"
    ]


EXPECTED_CLASS = {
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Heun": "DPMSolverMultistepScheduler",
    "DPM++ 3M SDE": "DPMSolverMultistepScheduler",
    "DPM++ SDE": "DPMSolverSinglestepScheduler",
    "DDIM": "DDIMScheduler",
    "PLMS": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LCM": "LCMScheduler",
}


@pytest.mark.parametrize("name", samplers.sampler_names())
def test_each_sampler_builds_under_automatic_and_sets_20_steps(name):
    scheduler = make_scheduler(name, "Automatic", SD15_SCHEDULER_CONFIG)
    if name == "LMS":
        assert type(scheduler).__name__ in ("LMSDiscreteScheduler", "ScipyFreeLMSDiscreteScheduler")
    else:
        assert type(scheduler).__name__ == EXPECTED_CLASS[name]
    scheduler.set_timesteps(20)
    assert len(scheduler.timesteps) >= 20
    # the model's noise schedule came through
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_start == 0.00085


def test_every_call_returns_a_new_scheduler():
    first = make_scheduler("DPM++ 2M", "Automatic", SD15_SCHEDULER_CONFIG)
    second = make_scheduler("DPM++ 2M", "Automatic", SD15_SCHEDULER_CONFIG)
    assert first is not second
    first.set_timesteps(10)
    second.set_timesteps(30)
    assert len(first.timesteps) == 10 and len(second.timesteps) == 30


def test_euler_automatic_is_k_diffusion_linspace_from_999():
    scheduler = make_scheduler("Euler", "Automatic", SD15_SCHEDULER_CONFIG)
    assert scheduler.config.timestep_spacing == "linspace"
    scheduler.set_timesteps(20)
    assert float(scheduler.timesteps[0]) == 999.0
    assert float(scheduler.timesteps[-1]) == 0.0
    # k-diffusion starts from noise scaled by sigma_max (no extra sqrt(sigma^2+1))
    assert float(scheduler.init_noise_sigma) == pytest.approx(float(scheduler.sigmas[0]))


@pytest.mark.parametrize("name", ["Euler a", "LMS", "Heun"])
def test_other_k_samplers_use_linspace_under_automatic(name):
    scheduler = make_scheduler(name, "Automatic", SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(20)
    assert scheduler.config.timestep_spacing == "linspace"
    assert float(scheduler.timesteps[0]) == 999.0


@pytest.mark.parametrize("name", ["DPM++ 2M", "DPM++ SDE", "DPM2", "DPM2 a"])
def test_automatic_means_karras_for_the_dpm_family(name):
    scheduler = make_scheduler(name, "Automatic", SD15_SCHEDULER_CONFIG)
    assert scheduler.config.use_karras_sigmas is True
    assert scheduler.config.use_exponential_sigmas is False


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_automatic_means_exponential_for_the_multistep_sde_family(name):
    scheduler = make_scheduler(name, "Automatic", SD15_SCHEDULER_CONFIG)
    assert scheduler.config.use_exponential_sigmas is True
    assert scheduler.config.use_karras_sigmas is False
    assert scheduler.config.algorithm_type == "sde-dpmsolver++"


def test_the_sde_variants_differ_where_a1111s_do():
    heun = make_scheduler("DPM++ 2M SDE Heun", "Automatic", SD15_SCHEDULER_CONFIG)
    third = make_scheduler("DPM++ 3M SDE", "Automatic", SD15_SCHEDULER_CONFIG)
    assert heun.config.solver_type == "heun" and heun.config.solver_order == 2
    assert third.config.solver_order == 3


def test_explicit_schedule_types_set_the_diffusers_flags():
    assert make_scheduler("Euler", "Karras", SD15_SCHEDULER_CONFIG).config.use_karras_sigmas is True
    assert make_scheduler("DPM++ 2M", "Exponential", SD15_SCHEDULER_CONFIG).config.use_exponential_sigmas is True
    sgm = make_scheduler("Euler", "SGM Uniform", SD15_SCHEDULER_CONFIG)
    assert sgm.config.timestep_spacing == "trailing"
    assert sgm.config.use_karras_sigmas is False
    uniform = make_scheduler("DPM++ 2M", "Uniform", SD15_SCHEDULER_CONFIG)
    assert uniform.config.use_karras_sigmas is False
    assert uniform.config.timestep_spacing == "linspace"


def test_karras_sigmas_span_the_models_sigma_range():
    karras = make_scheduler("Euler", "Karras", SD15_SCHEDULER_CONFIG)
    uniform = make_scheduler("Euler", "Uniform", SD15_SCHEDULER_CONFIG)
    karras.set_timesteps(20)
    uniform.set_timesteps(20)
    assert float(karras.sigmas[0]) == pytest.approx(float(uniform.sigmas[0]), rel=1e-5)
    assert float(karras.sigmas[-2]) == pytest.approx(float(uniform.sigmas[-2]), rel=1e-4)
    assert not torch.allclose(karras.sigmas, uniform.sigmas)


def test_flags_left_on_in_the_models_config_are_switched_off():
    config = {**SD15_SCHEDULER_CONFIG, "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    scheduler = make_scheduler("DPM++ 2M", "Uniform", config)
    assert scheduler.config.use_karras_sigmas is False
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.solver_order == 2


def test_model_prediction_type_is_kept():
    config = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    for name in ("Euler", "DPM++ 2M", "DDIM", "UniPC"):
        assert make_scheduler(name, "Automatic", config).config.prediction_type == "v_prediction"


def test_a1111_settings_for_timestep_samplers():
    ddim = make_scheduler("DDIM", "Automatic", SD15_SCHEDULER_CONFIG)
    ddim.set_timesteps(20)
    # A1111: range(0, 1000, 1000 // steps) + 1
    assert sorted(int(t) for t in ddim.timesteps) == [x + 1 for x in range(0, 1000, 50)]
    assert ddim.config.set_alpha_to_one is False and ddim.config.clip_sample is False
    plms = make_scheduler("PLMS", "Automatic", SD15_SCHEDULER_CONFIG)
    assert plms.config.skip_prk_steps is True
    unipc = make_scheduler("UniPC", "Automatic", SD15_SCHEDULER_CONFIG)
    assert unipc.config.solver_type == "bh1" and unipc.config.solver_order == 3


@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [("Euler a", "Karras"), ("DDIM", "Karras"), ("PLMS", "Exponential"), ("LCM", "SGM Uniform"), ("DPM++ SDE", "Uniform")],
)
def test_unsupported_pairs_raise_a_clear_error(sampler, schedule):
    with pytest.raises(UnknownSamplerError) as info:
        make_scheduler(sampler, schedule, SD15_SCHEDULER_CONFIG)
    message = str(info.value)
    assert repr(schedule) in message and repr(sampler) in message
    assert "Automatic" in message  # says what would work
    assert "Automatic" in samplers.supported_schedule_types(sampler)
    assert schedule not in samplers.supported_schedule_types(sampler)


def test_make_scheduler_rejects_unknown_names():
    with pytest.raises(UnknownSamplerError, match="Valid samplers"):
        make_scheduler("Nope", "Automatic", SD15_SCHEDULER_CONFIG)
    with pytest.raises(UnknownSamplerError, match="Valid schedule types"):
        make_scheduler("Euler", "Nope", SD15_SCHEDULER_CONFIG)


def test_make_scheduler_accepts_legacy_names():
    scheduler = make_scheduler("DPM++ 2M SDE Karras", "Automatic", SD15_SCHEDULER_CONFIG)
    assert scheduler.config.use_karras_sigmas is True
    assert scheduler.config.algorithm_type == "sde-dpmsolver++"


def test_beta_schedule_follows_scipy_availability():
    if samplers._have_scipy():
        assert make_scheduler("Euler", "Beta", SD15_SCHEDULER_CONFIG).config.use_beta_sigmas is True
    else:
        with pytest.raises(UnknownSamplerError, match="scipy"):
            make_scheduler("Euler", "Beta", SD15_SCHEDULER_CONFIG)


def test_recipes_only_use_options_their_class_has():
    import diffusers

    for name in samplers.sampler_names():
        recipe = samplers._RECIPES[name]
        cls = samplers._scheduler_class(recipe.class_name)
        accepted = samplers.init_parameters(cls)
        for label in samplers.supported_schedule_types(name):
            unknown = set(samplers.scheduler_overrides(name, label)) - accepted
            assert not unknown, (name, label, unknown)
        assert issubclass(cls, diffusers.SchedulerMixin)


def _step_twice(scheduler, seed: int):
    scheduler.set_timesteps(6)
    sample = torch.ones(1, 4, 8, 8) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps[:2]:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(0.1 * model_input, t, sample, generator=generator).prev_sample
    return sample


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM2 a"])
def test_stochastic_samplers_draw_noise_from_the_given_generator(name):
    same_a = _step_twice(make_scheduler(name, "Automatic", SD15_SCHEDULER_CONFIG), seed=1)
    same_b = _step_twice(make_scheduler(name, "Automatic", SD15_SCHEDULER_CONFIG), seed=1)
    other = _step_twice(make_scheduler(name, "Automatic", SD15_SCHEDULER_CONFIG), seed=2)
    assert torch.equal(same_a, same_b)
    assert not torch.allclose(same_a, other)


def test_lms_coefficients_are_the_exact_integrals():
    sigmas = [14.6, 9.7, 6.1, 3.3, 1.2, 0.0]
    for step in range(4):
        order = min(step + 1, 4)
        for current in range(order):
            # independent exact route: build the Lagrange basis with numpy's polynomial class
            nodes = [sigmas[step - k] for k in range(order) if k != current]
            poly = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
            poly = poly / poly(sigmas[step - current])
            antiderivative = poly.integ()
            expected = antiderivative(sigmas[step + 1]) - antiderivative(sigmas[step])
            got = scheduler_classes.lms_coefficient(sigmas, step, order, current)
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_lms_scheduler_matches_a_hand_written_lms_loop():
    scheduler = make_scheduler("LMS", "Automatic", SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(8)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
    sigmas = [float(s) for s in scheduler.sigmas]

    def fake_eps(x, sigma):  # a smooth stand-in for the UNet
        return (x - x0) / sigma * 0.9 + 0.01 * torch.tanh(x)

    sample = noise * sigmas[0]
    expected = sample.clone()
    derivatives = []
    for i, t in enumerate(scheduler.timesteps):
        eps = fake_eps(sample, sigmas[i])
        sample = scheduler.step(eps, t, sample).prev_sample

        d = (expected - (expected - sigmas[i] * fake_eps(expected, sigmas[i]))) / sigmas[i]
        derivatives = (derivatives + [d])[-4:]
        order = len(derivatives)
        weights = []
        for current in range(order):
            nodes = [sigmas[i - k] for k in range(order) if k != current]
            poly = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
            poly = poly / poly(sigmas[i - current])
            weights.append(poly.integ()(sigmas[i + 1]) - poly.integ()(sigmas[i]))
        expected = expected + sum(w * dd for w, dd in zip(weights, reversed(derivatives)))
    assert torch.allclose(sample, expected, rtol=1e-5, atol=1e-5)


def test_lms_class_is_diffusers_own_when_scipy_is_there():
    cls = samplers._scheduler_class("LMSDiscreteScheduler")
    if samplers._have_scipy():
        import diffusers

        assert cls is diffusers.LMSDiscreteScheduler
    else:
        assert cls is scheduler_classes.scipy_free_lms_scheduler_class()


def test_api_lists_have_a1111s_shapes():
    listed = samplers.samplers_api_list()
    assert [entry["name"] for entry in listed] == samplers.sampler_names()
    dpmpp = next(entry for entry in listed if entry["name"] == "DPM++ 2M")
    assert dpmpp == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    listed[0]["aliases"].append("mutated")
    assert "mutated" not in samplers.SAMPLERS[0].aliases

    schedulers = samplers.schedulers_api_list()
    assert schedulers[0] == {
        "name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False
    }
    karras = next(entry for entry in schedulers if entry["name"] == "karras")
    assert karras["default_rho"] == 7.0
    sgm = next(entry for entry in schedulers if entry["name"] == "sgm_uniform")
    assert sgm["aliases"] == ["SGMUniform"] and sgm["label"] == "SGM Uniform"
    for entry in schedulers:
        assert set(entry) == {"name", "label", "aliases", "default_rho", "need_inner_model"}


def test_importing_the_module_does_not_import_diffusers():
    code = "import sys, modules.core.samplers as s; s.samplers_api_list(); s.resolve('k_euler'); print('diffusers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(_repo_root()))
    assert out.stdout.strip() == "False False"


def _repo_root():
    from modules.core.paths import REPO_ROOT

    return REPO_ROOT


def _perfect_noise_prediction(config):
    """An epsilon model that knows the clean latent: it makes every correct sampler land on it."""
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).numpy()
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

    def predict(model_input, t, clean):
        # diffusers maps fractional timesteps to sigmas by linear interpolation; so does this
        sigma = float(np.interp(float(t), np.arange(1000), sigmas))
        alpha = 1 / (1 + sigma * sigma)
        return ((model_input - alpha**0.5 * clean) / (1 - alpha) ** 0.5).float()

    return predict


# Samplers whose last step lands on sigma_min rather than 0, as in A1111 (DDIM/PLMS stop at t=1,
# UniPC at t=1/N): their result keeps about sigma_min (0.03) times the noise.
ENDS_AT_SIGMA_MIN = {"DDIM", "PLMS", "UniPC"}


def _denoise_cases():
    for name in samplers.sampler_names():
        for label in samplers.supported_schedule_types(name):
            if label == "Beta":
                continue
            yield name, label, 7  # odd: second-order singlestep ends on a first-order step
            if label == "Automatic":
                yield name, label, 20


@pytest.mark.parametrize(("name", "schedule", "steps"), list(_denoise_cases()))
def test_every_supported_pair_denoises_to_the_clean_latent(name, schedule, steps):
    import inspect

    scheduler = make_scheduler(name, schedule, SD15_SCHEDULER_CONFIG)
    predict = _perfect_noise_prediction(SD15_SCHEDULER_CONFIG)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(steps)
    # the pipeline's loop: scale the start noise, then scale_model_input / model / step
    x = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(predict(model_input, t, clean), t, x, **extra).prev_sample
    tolerance = 0.15 if name in ENDS_AT_SIGMA_MIN else 2e-3
    assert torch.isfinite(x).all()
    assert torch.allclose(x, clean, atol=tolerance), (x - clean).abs().max()
