"""Session settings without sockets: how tools and the tool choice combine across updates."""

from __future__ import annotations

import pytest

from assistant.engine.sampling import SamplingParams
from assistant.errors import AssistantError
from assistant.protocol import SettingChanges
from assistant.session import Settings
from assistant.tools import FunctionTool, ToolChoice

WEATHER = FunctionTool("get_weather", "The weather.")
BASE = Settings("Be brief.", SamplingParams())


def test_tools_and_choice_are_applied_and_kept() -> None:
    settings = BASE.apply(SettingChanges(tools=(WEATHER,), tool_choice={"type": "function", "name": "get_weather"}),
                          "session.")
    assert settings.tools == (WEATHER,) and settings.tool_choice == ToolChoice("function", "get_weather")
    assert settings.apply(SettingChanges(instructions="x"), "session.").tool_choice == settings.tool_choice
    assert settings.calls_tools and "get_weather" in settings.system_prompt(template_renders_tools=False)
    assert settings.system_prompt(template_renders_tools=False).startswith("Be brief.\n\n")
    assert settings.system_prompt(template_renders_tools=True) == "Be brief."  # the template lists them
    assert not BASE.calls_tools and BASE.system_prompt(template_renders_tools=False) == "Be brief."


def test_none_keeps_the_tools_out_of_the_prompt() -> None:
    settings = BASE.apply(SettingChanges(tools=(WEATHER,), tool_choice="none"), "response.")
    assert not settings.calls_tools and settings.system_prompt(template_renders_tools=False) == "Be brief."


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_tools_that_no_longer_fit_the_choice_in_effect_are_refused(choice: object) -> None:
    settings = BASE.apply(SettingChanges(tools=(WEATHER,), tool_choice=choice), "session.")
    with pytest.raises(AssistantError) as info:
        settings.apply(SettingChanges(tools=()), "response.")
    assert (info.value.code, info.value.param) == ("invalid_value", "response.tools")
    assert settings.apply(SettingChanges(tools=(), tool_choice="auto"), "response.").tools == ()
