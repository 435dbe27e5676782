"""Speech to text in Mandarin: the English recipe (`configs/speech_to_text.py`) on the built-in
`speech_zh` utterances (eSpeak NG's Mandarin voice reading the Chinese shapes captions and
Chinese digit strings), scored by character error rate (each Chinese character one unit; WER is
not meaningful without word segmentation).

Run: python train.py --config configs/speech_to_text_zh.py
"""

from configs import speech_to_text


def get_config():
    c = speech_to_text.get_config()
    c.data.name = "speech_zh"
    # Mandarin utterances run to ~5.8 s; 3 bytes per character, 16 characters at most.
    c.speech.max_seconds = 6.0
    return c
