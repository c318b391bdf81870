"""Chat templates of each tool-calling family, cut down to what tool calling touches.

Each keeps its family's markers and the way it shows tools, earlier calls and results, so the
renderer and the parsers meet them as they meet the real templates in GGUF files.
"""

from __future__ import annotations

from tests.tiny_model import TINY_CHAT_TEMPLATE

__all__ = ["GEMMA_LIKE", "LLAMA3", "MISTRAL", "QWEN", "TEMPLATES", "THINKING"]

# Qwen 2.5 (Hermes 2 Pro style): tools in the system turn, calls in <tool_call> tags.
QWEN = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are Qwen.{% endif %}\n\n"
    "# Tools\n\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\n"
    "For each function call, return a json object within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}<|im_start|>user\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

# Llama 3.1: tools in the first user turn, calls as {"name", "parameters"}, results from ipython.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "{%- if tools %}Environment: ipython\n{%- endif %}{{ system }}<|eot_id|>"
    "{%- if tools %}{%- set first = messages[0].content %}{%- set messages = messages[1:] %}"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of arguments}.\n\n'
    "{%- for tool in tools %}{{ tool | tojson(indent=4) }}\n\n{%- endfor %}{{ first }}<|eot_id|>"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{%- set call = message.tool_calls[0].function %}"
    '{"name": "{{ call.name }}", "parameters": {{ call.arguments | tojson }}}<|eot_id|>'
    "{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ message.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)

# Mistral Nemo: tools before the last user turn, calls as [TOOL_CALLS][...] with 9-character ids.
MISTRAL = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for message in loop_messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'user' %}"
    "{%- if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]"
    "{%- endif %}[INST]{%- if system is defined and loop.index0 == ns.last_user %}{{ system }}\n\n"
    "{%- endif %}{{ message.content }}[/INST]"
    "{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS]["
    "{%- for call in message.tool_calls %}"
    "{%- if call.id is not defined or call.id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}, '
    '"id": "{{ call.id }}"}{%- if not loop.last %}, {% endif %}'
    "{%- endfor %}]{{ eos_token }}"
    "{%- elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    '[TOOL_RESULTS]{"content": {{ message.content | tojson }}, "call_id": "{{ message.tool_call_id }}"}'
    "[/TOOL_RESULTS]"
    "{%- endif %}{%- endfor %}"
)

# Gemma-style: no tools, no system role, strict alternation (what the generic format must work with).
GEMMA_LIKE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}\n"
    "{{ message.content }}<end_of_turn>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<start_of_turn>model\n{%- endif %}"
)

# Qwen 3 style: a reasoning block the template strips from earlier turns.
THINKING = QWEN.replace(
    "{{ message.content or '' }}", "{{ (message.content or '').split('</think>')[-1] | trim }}"
).replace("<|im_start|>assistant\n{%- endif %}", "<|im_start|>assistant\n<think>\n{%- endif %}")

TEMPLATES = {"hermes": QWEN, "llama3": LLAMA3, "mistral": MISTRAL, "generic": TINY_CHAT_TEMPLATE}
