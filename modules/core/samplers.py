"""A1111 sampler and schedule-type names, and the fresh diffusers scheduler each request samples with.

A1111 names a sampling method ("DPM++ 2M") and, since v1.9, a separate schedule type ("Karras").
Older clients still send combined names ("DPM++ 2M Karras", "k_dpmpp_2m_ka"); `resolve` turns any
of them into the canonical (sampler, schedule type label) pair. `make_scheduler` builds a new
diffusers scheduler for that pair from the model's own scheduler config, reproducing what A1111
does implicitly under "Automatic" (contract section 6).

diffusers is imported lazily: listing names (UI dropdowns, /sdapi/v1/samplers) must not pay for
importing torch.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from modules.core import scheduler_classes

DEFAULT_UI_SAMPLER = "DPM++ 2M"
DEFAULT_API_SAMPLER = "Euler"
AUTOMATIC = "Automatic"


class UnknownSamplerError(ValueError):
    """A sampler or schedule type name that does not resolve, or a pair diffusers cannot build."""


@dataclass(frozen=True)
class SamplerInfo:
    """One A1111 sampler: its display name, the aliases clients may send, and A1111's options dict."""

    name: str
    aliases: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleType:
    """One A1111 schedule type (sd_schedulers.Scheduler): internal name, UI label and API fields."""

    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


# A1111 v1.10's order (k-diffusion samplers, then timestep samplers, then LCM), limited to the ones
# diffusers can run. The options dicts are A1111's, because /sdapi/v1/samplers returns them verbatim.
SAMPLERS: list[SamplerInfo] = [
    SamplerInfo("DPM++ 2M", ["k_dpmpp_2m"], {"scheduler": "karras"}),
    SamplerInfo("DPM++ SDE", ["k_dpmpp_sde"], {"scheduler": "karras", "second_order": True, "brownian_noise": True}),
    SamplerInfo("DPM++ 2M SDE", ["k_dpmpp_2m_sde"], {"scheduler": "exponential", "brownian_noise": True}),
    SamplerInfo(
        "DPM++ 2M SDE Heun",
        ["k_dpmpp_2m_sde_heun"],
        {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"},
    ),
    SamplerInfo(
        "DPM++ 3M SDE",
        ["k_dpmpp_3m_sde"],
        {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
    ),
    SamplerInfo("Euler a", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    SamplerInfo("Euler", ["k_euler"], {}),
    SamplerInfo("LMS", ["k_lms"], {}),
    SamplerInfo("Heun", ["k_heun"], {"second_order": True}),
    SamplerInfo(
        "DPM2", ["k_dpm_2"], {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True}
    ),
    SamplerInfo(
        "DPM2 a",
        ["k_dpm_2_a"],
        {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True},
    ),
    SamplerInfo("DDIM", ["ddim"], {}),
    SamplerInfo("PLMS", ["plms"], {}),
    SamplerInfo("UniPC", ["unipc"], {}),
    SamplerInfo("LCM", ["k_lcm"], {}),
]

SCHEDULE_TYPES: list[ScheduleType] = [
    ScheduleType("automatic", "Automatic"),
    ScheduleType("uniform", "Uniform", need_inner_model=True),
    ScheduleType("karras", "Karras", default_rho=7.0),
    ScheduleType("exponential", "Exponential"),
    ScheduleType("sgm_uniform", "SGM Uniform", aliases=["SGMUniform"], need_inner_model=True),
    ScheduleType("beta", "Beta", need_inner_model=True),
]

_SAMPLER_BY_NAME: dict[str, SamplerInfo] = {s.name: s for s in SAMPLERS}

# Lower-cased name or alias -> canonical name.
_SAMPLER_LOOKUP: dict[str, str] = {}
for _info in SAMPLERS:
    _SAMPLER_LOOKUP[_info.name.lower()] = _info.name
    for _alias in _info.aliases:
        _SAMPLER_LOOKUP[_alias.lower()] = _info.name

# Lower-cased label, internal name or alias -> label.
_SCHEDULE_LOOKUP: dict[str, str] = {}
for _sched in SCHEDULE_TYPES:
    for _key in (_sched.label, _sched.name, *(_sched.aliases or [])):
        _SCHEDULE_LOOKUP[_key.lower()] = _sched.label

# Suffixes of pre-v1.9 combined names ("DPM++ 2M Karras"), longest first so "SGM Uniform" is tried
# before "Uniform".
_SCHEDULE_SUFFIXES: list[tuple[str, str]] = sorted(
    ((key, label) for key, label in _SCHEDULE_LOOKUP.items() if "_" not in key),
    key=lambda pair: len(pair[0]),
    reverse=True,
)

# Old k-diffusion aliases carried the schedule in a suffix: k_dpmpp_2m_ka, k_dpmpp_2m_sde_exp.
_ALIAS_SCHEDULE_SUFFIX = re.compile(r"^(?P<base>k_\w+?)_(?P<sched>ka|exp)$")
_ALIAS_SUFFIX_LABEL = {"ka": "Karras", "exp": "Exponential"}


def sampler_names() -> list[str]:
    """Canonical sampler names in A1111's display order."""
    return [s.name for s in SAMPLERS]


def schedule_type_labels() -> list[str]:
    """Schedule type labels in A1111's display order (Automatic first)."""
    return [s.label for s in SCHEDULE_TYPES]


def get_sampler(name: str) -> SamplerInfo:
    """The SamplerInfo of a canonical name (as `resolve` returns it)."""
    try:
        return _SAMPLER_BY_NAME[name]
    except KeyError:
        raise UnknownSamplerError(_unknown_sampler_message(name)) from None


def resolve_schedule_type(name: str | None) -> str:
    """Canonical label of a schedule type given by label, internal name or alias, any case.

    None or "" means Automatic.
    """
    if name is None or not name.strip():
        return AUTOMATIC
    label = _SCHEDULE_LOOKUP.get(_normalise(name))
    if label is None:
        raise UnknownSamplerError(
            f"Unknown schedule type {name!r}. Valid schedule types: {', '.join(schedule_type_labels())}."
        )
    return label


def resolve(
    sampler_name: str | None,
    scheduler: str | None = None,
    *,
    default: str = DEFAULT_API_SAMPLER,
) -> tuple[str, str]:
    """(canonical sampler name, schedule type label) for what a client sent.

    Accepts canonical names and aliases in any case, and legacy combined names ("DPM++ 2M Karras",
    "k_dpmpp_2m_ka"). An explicit `scheduler` other than Automatic wins over the one a legacy name
    implies; otherwise the implied one is used. A None/"" sampler means `default`.
    Unlike A1111 (which falls back to its first sampler), an unknown name raises
    UnknownSamplerError so the API can answer 400.
    """
    explicit = resolve_schedule_type(scheduler)
    if sampler_name is None or not sampler_name.strip():
        sampler_name = default

    canonical, implied = _split_sampler_name(sampler_name)
    if explicit != AUTOMATIC:
        return canonical, explicit
    return canonical, implied or AUTOMATIC


def _normalise(name: str) -> str:
    return " ".join(name.split()).lower()


def _split_sampler_name(name: str) -> tuple[str, str | None]:
    key = _normalise(name)
    exact = _SAMPLER_LOOKUP.get(key)
    if exact is not None:
        return exact, None

    match = _ALIAS_SCHEDULE_SUFFIX.match(key)
    if match and match.group("base") in _SAMPLER_LOOKUP:
        return _SAMPLER_LOOKUP[match.group("base")], _ALIAS_SUFFIX_LABEL[match.group("sched")]

    for suffix, label in _SCHEDULE_SUFFIXES:
        if key.endswith(" " + suffix):
            base = _SAMPLER_LOOKUP.get(key[: -len(suffix) - 1].rstrip())
            if base is not None:
                return base, label

    raise UnknownSamplerError(_unknown_sampler_message(name))


def _unknown_sampler_message(name: str) -> str:
    return f"Unknown sampler {name!r}. Valid samplers: {', '.join(sampler_names())}."


# --- the A1111 JSON shapes -------------------------------------------------------------------------


def samplers_api_list() -> list[dict[str, Any]]:
    """/sdapi/v1/samplers: [{name, aliases, options}] (fresh copies; callers may mutate them)."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in SAMPLERS]


def schedulers_api_list() -> list[dict[str, Any]]:
    """/sdapi/v1/schedulers: [{name, label, aliases, default_rho, need_inner_model}]."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) if s.aliases is not None else None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULE_TYPES
    ]


# --- building diffusers schedulers -----------------------------------------------------------------

_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_FLAG_OF_LABEL = {"Karras": "use_karras_sigmas", "Exponential": "use_exponential_sigmas", "Beta": "use_beta_sigmas"}


def _sigma_schedules(spacing: str = "linspace") -> dict[str, dict[str, Any]]:
    """Schedule overrides for schedulers that take both a spacing and a sigma transform.

    Every flag is written explicitly: the model's own scheduler config may already switch one on
    (some SDXL checkpoints ship Karras), and a left-over flag would silently change the schedule.
    The spacing stays linspace under Karras/Exponential/Beta because some diffusers classes take
    sigma_max from the spaced timesteps: linspace starts at t=999, A1111's sigma_max.
    "Uniform" is k-diffusion's get_sigmas(n): n timesteps from 999 down to 0. The k-diffusion-style
    classes (Euler, LMS, Heun, DPM2) do exactly that under linspace; the DPM-Solver and UniPC
    classes lay linspace out as n + 1 points without the last one, the closest they offer.
    """
    plain = {flag: False for flag in _SIGMA_FLAGS}
    schedules: dict[str, dict[str, Any]] = {
        "Uniform": {**plain, "timestep_spacing": spacing},
        "SGM Uniform": {**plain, "timestep_spacing": "trailing"},
    }
    for label, flag in _FLAG_OF_LABEL.items():
        schedules[label] = {**plain, flag: True, "timestep_spacing": spacing}
    return schedules


@dataclass(frozen=True)
class _Recipe:
    """How one A1111 sampler is built in diffusers.

    class_name: the diffusers scheduler class ("LMS" is special-cased: see _scheduler_class).
    fixed: settings that define the method itself, written over the model's config.
    automatic: the schedule label "Automatic" stands for (A1111's sampler option 'scheduler').
    schedules: label -> config overrides; a label missing here is not supported by that class.
    """

    class_name: str
    fixed: Mapping[str, Any]
    automatic: str
    schedules: Mapping[str, Mapping[str, Any]]


# DPMSolverMultistep keeps whatever algorithm the checkpoint's config names, so each DPM++ recipe
# states algorithm, order and solver type, and the final step goes to sigma 0 as k-diffusion does.
_DPM_MULTISTEP_BASE = {
    "lower_order_final": True,
    "euler_at_final": False,
    "use_lu_lambdas": False,
    "final_sigmas_type": "zero",
}

# DPMSolverSinglestep has no timestep_spacing knob: its own grid is linspace(999, 0, n + 1) without
# the last point, which is exactly A1111's "SGM Uniform"; plain "Uniform" (n points down to 0)
# cannot be expressed.
_SINGLESTEP_SCHEDULES = {
    label: {flag: flag == _FLAG_OF_LABEL.get(label) for flag in _SIGMA_FLAGS}
    for label in ("Karras", "Exponential", "Beta", "SGM Uniform")
}

# A1111's DDIM/PLMS take timesteps range(0, 1000, 1000 // steps) + 1, i.e. diffusers' "leading"
# spacing with steps_offset 1, and use alphas_cumprod[0] (not 1) as the last "previous" alpha.
# A1111 ignores the schedule type for these samplers; here only the two spacings that mean
# something for a timestep sampler are offered and the rest raise.
_TIMESTEP_SCHEDULES = {
    "Uniform": {"timestep_spacing": "leading", "steps_offset": 1},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}

_RECIPES: dict[str, _Recipe] = {
    "DPM++ 2M": _Recipe(
        "DPMSolverMultistepScheduler",
        {**_DPM_MULTISTEP_BASE, "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
        "Karras",
        _sigma_schedules(),
    ),
    # DPMSolverSDEScheduler needs torchsde (not a dependency) and seeds its Brownian tree from a
    # config value instead of the per-image generators, which would break seed reproducibility.
    # The singlestep DPM-Solver++ in its SDE form is the same family (2nd order, two model calls
    # per step, fresh noise each step) and draws its noise from the generators the pipeline gets.
    "DPM++ SDE": _Recipe(
        "DPMSolverSinglestepScheduler",
        {
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 2,
            "solver_type": "midpoint",
            "lower_order_final": True,
            "final_sigmas_type": "zero",
        },
        "Karras",
        _SINGLESTEP_SCHEDULES,
    ),
    "DPM++ 2M SDE": _Recipe(
        "DPMSolverMultistepScheduler",
        {**_DPM_MULTISTEP_BASE, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
        "Exponential",
        _sigma_schedules(),
    ),
    "DPM++ 2M SDE Heun": _Recipe(
        "DPMSolverMultistepScheduler",
        {**_DPM_MULTISTEP_BASE, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
        "Exponential",
        _sigma_schedules(),
    ),
    "DPM++ 3M SDE": _Recipe(
        "DPMSolverMultistepScheduler",
        {**_DPM_MULTISTEP_BASE, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "midpoint"},
        "Exponential",
        _sigma_schedules(),
    ),
    # diffusers' ancestral Euler has no sigma transforms, so Karras/Exponential/Beta raise.
    "Euler a": _Recipe(
        "EulerAncestralDiscreteScheduler",
        {},
        "Uniform",
        {"Uniform": {"timestep_spacing": "linspace"}, "SGM Uniform": {"timestep_spacing": "trailing"}},
    ),
    "Euler": _Recipe(
        "EulerDiscreteScheduler",
        {"interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero"},
        "Uniform",
        _sigma_schedules(),
    ),
    "LMS": _Recipe("LMSDiscreteScheduler", {}, "Uniform", _sigma_schedules()),
    "Heun": _Recipe("HeunDiscreteScheduler", {}, "Uniform", _sigma_schedules()),
    "DPM2": _Recipe("KDPM2DiscreteScheduler", {}, "Karras", _sigma_schedules()),
    "DPM2 a": _Recipe("KDPM2AncestralDiscreteScheduler", {}, "Karras", _sigma_schedules()),
    "DDIM": _Recipe(
        "DDIMScheduler",
        {"clip_sample": False, "set_alpha_to_one": False, "thresholding": False},
        "Uniform",
        _TIMESTEP_SCHEDULES,
    ),
    "PLMS": _Recipe(
        "PNDMScheduler",
        {"skip_prk_steps": True, "set_alpha_to_one": False},
        "Uniform",
        _TIMESTEP_SCHEDULES,
    ),
    # A1111's UniPC defaults: variant bh1, order 3, lower order final, "time_uniform" steps
    # (continuous time from 1 down to 1/N, i.e. diffusers' linspace spacing).
    "UniPC": _Recipe(
        "UniPCMultistepScheduler",
        {
            "solver_type": "bh1",
            "solver_order": 3,
            "lower_order_final": True,
            "predict_x0": True,
            "disable_corrector": [],
            # A1111's UniPC stops at t = 1/N, i.e. sigma_min. Going on to sigma 0 (diffusers'
            # "zero") also breaks bh1: its last step divides by an infinite log-SNR step and
            # returns NaN.
            "final_sigmas_type": "sigma_min",
        },
        "Uniform",
        _sigma_schedules(),
    ),
    # LCM picks its timesteps from its own distilled grid (original_inference_steps); no spacing or
    # sigma transform applies, so only the plain schedule exists.
    "LCM": _Recipe("LCMScheduler", {"clip_sample": False}, "Uniform", {"Uniform": {}}),
}


def automatic_schedule(sampler: str) -> str:
    """The schedule type that "Automatic" stands for with this sampler (e.g. Karras for DPM++ 2M)."""
    return _recipe(resolve(sampler)[0]).automatic


def supported_schedule_types(sampler: str) -> list[str]:
    """Schedule labels `make_scheduler` accepts for a canonical sampler name, Automatic first."""
    recipe = _recipe(sampler)
    return [s.label for s in SCHEDULE_TYPES if s.label == AUTOMATIC or s.label in recipe.schedules]


def scheduler_overrides(sampler: str, schedule_type: str) -> dict[str, Any]:
    """The config values `make_scheduler` writes over the model's scheduler config for this pair."""
    canonical, label = resolve(sampler, schedule_type)
    recipe = _recipe(canonical)
    effective = recipe.automatic if label == AUTOMATIC else label
    try:
        schedule = recipe.schedules[effective]
    except KeyError:
        raise UnknownSamplerError(
            f"Schedule type {label!r} is not available for sampler {canonical!r} "
            f"(diffusers' {recipe.class_name} cannot do it). "
            f"Use one of: {', '.join(supported_schedule_types(canonical))}."
        ) from None
    return {**recipe.fixed, **schedule}


def make_scheduler(sampler: str, schedule_type: str, base_config: Mapping[str, Any], *, eta: float | None = None):
    """A new diffusers scheduler for (sampler, schedule type), built from the model's scheduler config.

    `base_config` is the checkpoint's scheduler config (e.g. `pipe.scheduler.config`); it supplies
    the noise schedule (betas, prediction type, steps offset ...). Every call returns a new object:
    schedulers keep per-run state and are not thread-safe, so requests must never share one.
    Raises UnknownSamplerError for unknown names and for pairs the diffusers class cannot build.
    `eta` (see `resolve_eta`) picks the eta variant of a scheduler where one is needed.
    """
    canonical, label = resolve(sampler, schedule_type)
    overrides = scheduler_overrides(canonical, label)
    recipe = _RECIPES[canonical]
    if overrides.get("use_beta_sigmas") and not _have_scipy():
        raise UnknownSamplerError(
            f"Schedule type 'Beta' needs scipy, which is not installed; pick another schedule type for {canonical!r}."
        )
    cls = _scheduler_class(recipe.class_name)
    if cls is scheduler_classes.scipy_free_lms_scheduler_class():
        # Pin the Euler knobs that diffusers' LMS class does not have to the values LMS behaves as.
        overrides = {
            "interpolation_type": "linear",
            "timestep_type": "discrete",
            "final_sigmas_type": "zero",
            "rescale_betas_zero_snr": False,
            **overrides,
        }
    # Only the keys this class takes: the checkpoint's config is usually another class's (PNDM for
    # SD1.5), and diffusers would log a warning for every foreign key on every request.
    accepted = init_parameters(cls)
    config = {k: v for k, v in dict(base_config).items() if k in accepted}
    try:
        return with_eta(cls.from_config(config, **overrides), eta)
    except (ImportError, ValueError, NotImplementedError) as exc:
        raise UnknownSamplerError(
            f"Cannot build sampler {canonical!r} with schedule type {label!r} for this model: {exc}"
        ) from exc


def init_parameters(cls) -> frozenset[str]:
    """The config keys a scheduler class takes (its __init__ parameters), to build it from another class's config."""
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self"}


def _recipe(sampler: str) -> _Recipe:
    try:
        return _RECIPES[sampler]
    except KeyError:
        raise UnknownSamplerError(_unknown_sampler_message(sampler)) from None


@functools.cache
def _have_scipy() -> bool:
    return importlib.util.find_spec("scipy") is not None


def _scheduler_class(class_name: str):
    import diffusers

    if class_name == "LMSDiscreteScheduler" and not _have_scipy():
        return scheduler_classes.scipy_free_lms_scheduler_class()
    return getattr(diffusers, class_name)


# -- eta --------------------------------------------------------------------------------------------------
# A1111's "Eta for DDIM" (eta_ddim, default 0) and "Eta for k-diffusion samplers" (eta_ancestral, default 1),
# overridden by a request's `eta`. diffusers' DDIM takes eta natively; its ancestral Euler has eta 1 built in,
# so "Euler a" with another eta runs on `eta_euler_ancestral_scheduler_class`. The other ancestral and SDE
# samplers have no eta in diffusers: they run with eta 1 and the answer says so.
ETA_DDIM_SAMPLERS = frozenset({"DDIM"})
ETA_ANCESTRAL_SAMPLERS = frozenset({"Euler a"})
_STOCHASTIC_OPTIONS = ("uses_ensd", "brownian_noise")


@dataclass(frozen=True)
class EtaChoice:
    """The eta a request runs with (None: the scheduler has none), its infotext entry, and a warning when
    the asked eta cannot be applied."""
    eta: float | None
    infotext: dict[str, float]
    warning: str | None = None


def is_stochastic(sampler: str) -> bool:
    """Whether a sampler draws fresh noise while it runs (ancestral and SDE samplers: eta and ENSD matter)."""
    info = _SAMPLER_BY_NAME[resolve(sampler)[0]]
    return any(info.options.get(k) for k in _STOCHASTIC_OPTIONS) or info.name in ETA_ANCESTRAL_SAMPLERS


def resolve_eta(sampler: str, requested: float | None, settings: Mapping[str, Any]) -> EtaChoice:
    """A1111's rule: the request's eta, else the setting of the sampler's kind; written to the infotext
    ("Eta DDIM" / "Eta") only when it differs from that kind's default."""
    canonical = resolve(sampler)[0]
    if canonical in ETA_DDIM_SAMPLERS:
        eta = float(requested if requested is not None else settings.get("eta_ddim", 0.0))
        return EtaChoice(eta, {"Eta DDIM": eta} if eta != 0 else {})
    if not is_stochastic(canonical):
        return EtaChoice(None, {})
    eta = float(requested if requested is not None else settings.get("eta_ancestral", 1.0))
    if canonical in ETA_ANCESTRAL_SAMPLERS:
        return EtaChoice(eta, {"Eta": eta} if eta != 1 else {})
    if eta != 1:
        return EtaChoice(None, {}, f"eta {eta:g} is not available for {canonical} (diffusers' scheduler has no eta); "
                                   f"it ran with eta 1 (eta works with DDIM and Euler a)")
    return EtaChoice(None, {})


def with_eta(scheduler, eta: float | None):
    """The scheduler that can run `eta`: "Euler a" with an eta other than 1 becomes the eta variant of the same
    config; anything else is returned as it is (DDIM takes eta as a step argument)."""
    import diffusers
    if eta is None or eta == 1 or type(scheduler) is not diffusers.EulerAncestralDiscreteScheduler:
        return scheduler
    return scheduler_classes.eta_euler_ancestral_scheduler_class().from_config(scheduler.config)
