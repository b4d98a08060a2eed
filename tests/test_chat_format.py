"""Chat formats cut into per-turn pieces that add up to the template's own rendering."""
import pytest

from belle_edge.errors import InputError, UnsupportedModelError
from belle_edge.runtime.chat_format import BelleFormat, TemplateFormat, make_chat_format

from conftest import CHATML

LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
          "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + "
          "'[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
          "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template", [CHATML, LLAMA2])
@pytest.mark.parametrize("system", [None, "你是电商客服。"])
def test_turn_pieces_add_up_to_the_full_rendering(template, system):
    fmt = TemplateFormat(template, bos_token="<s>", eos_token="</s>")
    # replies as a model writes them after "[/INST]" / "assistant\n": with their own leading space
    convo = [("你好", " 您好！"), ("退货怎么办？", " 七天无理由退货。"), ("thanks", " You're welcome.")]
    messages = [{"role": "system", "content": system}] if system else []
    pieced = fmt.system_text(system)
    for i, (user, reply) in enumerate(convo):
        pieced += fmt.first_turn_text(system, user) if i == 0 else fmt.turn_text(user)
        messages.append({"role": "user", "content": user})
        if i == len(convo) - 1:
            break
        pieced += reply + fmt.reply_end
        messages.append({"role": "assistant", "content": reply})
    assert pieced == fmt._render(messages, True)


def test_a_template_that_does_not_render_turn_by_turn_is_refused():
    reversed_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(UnsupportedModelError, match="does not render turn by turn"):
        TemplateFormat(reversed_template)


def test_belle_formats():
    v1 = BelleFormat("belle")
    assert v1.first_turn_text(None, "你好") == "Human: 你好\n\nAssistant:"
    assert v1.reply_end == "\n\n" and "Human:" in v1.stop_strings
    v2 = BelleFormat("belle-v2", eos_token="</s>")
    assert v2.turn_text("你好") == "Human: \n你好\n\nAssistant: \n" and v2.reply_end == "</s>"
    assert v1.system_text("系统") == "系统\n\n" and v1.system_text(None) == ""


def test_auto_prefers_the_checkpoints_template():
    assert make_chat_format("auto", template=CHATML, bos_token=None, eos_token=None, where="x").name == "template"
    assert make_chat_format("auto", template=None, bos_token=None, eos_token=None, where="x").name == "belle"
    with pytest.raises(InputError, match="expected one of auto, template, belle, belle-v2"):
        make_chat_format("chatml", template=None, bos_token=None, eos_token=None, where="x")


def test_a_template_that_refuses_system_prompts_works_without_one():
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}" + CHATML)
    fmt = TemplateFormat(template)
    assert fmt.first_turn_text(None, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(InputError, match="does not accept a system prompt"):
        fmt.system_text("你是客服。")


def test_a_template_that_cannot_render_is_refused():
    with pytest.raises(UnsupportedModelError, match="cannot render a conversation"):
        TemplateFormat("{{ messages[0]['content'] + 1 }}")
