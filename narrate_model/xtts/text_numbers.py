"""XTTS's per-language text expansion: numbers, abbreviations and symbols spelled out as words.

Reproduces coqui-tts 0.28's ``multilingual_cleaners`` pieces (the XTTS-v2 GPT was trained on text cleaned this
way, so the quirks are kept on purpose and each is named where it happens). Languages use their base code
(``zh``, not ``zh-cn``). Chinese numbers go through :func:`normalize_chinese`, a re-implementation of the rules
of the ``TextNorm`` normaliser that XTTS bundles; every other language goes through ``num2words``.
"""
from __future__ import annotations

import re
import string

from num2words import num2words

from ..errors import NarrateInputError

_LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese",
    "pl": "Polish", "tr": "Turkish", "ru": "Russian", "nl": "Dutch", "cs": "Czech", "ar": "Arabic",
    "zh": "Chinese", "hu": "Hungarian", "ko": "Korean", "ja": "Japanese", "hi": "Hindi",
}


def language_name(lang: str) -> str:
    return _LANGUAGE_NAMES.get(lang, lang)


# --------------------------------------------------------------------------------------------------------------
# Abbreviations: "<abbr>." (case-insensitive, at a word start) -> word, applied in this order (mrs before mr).
# --------------------------------------------------------------------------------------------------------------
_ABBREVIATIONS: dict[str, list[tuple[str, str]]] = {
    "en": [("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
           ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"), ("rev", "reverend"),
           ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"), ("capt", "captain"),
           ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"), ("ft", "fort")],
    "es": [("sra", "señora"), ("sr", "señor"), ("dr", "doctor"), ("dra", "doctora"), ("st", "santo"),
           ("co", "compañía"), ("jr", "junior"), ("ltd", "limitada")],
    "fr": [("mme", "madame"), ("mr", "monsieur"), ("dr", "docteur"), ("st", "saint"), ("co", "compagnie"),
           ("jr", "junior"), ("ltd", "limitée")],
    "de": [("fr", "frau"), ("dr", "doktor"), ("st", "sankt"), ("co", "firma"), ("jr", "junior")],
    "pt": [("sra", "senhora"), ("sr", "senhor"), ("dr", "doutor"), ("dra", "doutora"), ("st", "santo"),
           ("co", "companhia"), ("jr", "júnior"), ("ltd", "limitada")],
    "it": [("sig", "signore"), ("dr", "dottore"), ("st", "santo"), ("co", "compagnia"), ("jr", "junior"),
           ("ltd", "limitata")],
    "pl": [("p", "pani"), ("m", "pan"), ("dr", "doktor"), ("sw", "święty"), ("jr", "junior")],
    "cs": [("dr", "doktor"), ("ing", "inženýr"), ("p", "pan")],
    "nl": [("dhr", "de heer"), ("mevr", "mevrouw"), ("dr", "dokter"), ("jhr", "jonkheer")],
    "tr": [("b", "bay"), ("byk", "büyük"), ("dr", "doktor")],
    "hu": [("dr", "doktor"), ("b", "bácsi"), ("nőv", "nővér")],
}
_ABBREVIATION_RES = {
    lang: [(re.compile(rf"\b{abbr}\.", re.IGNORECASE), word) for abbr, word in pairs]
    for lang, pairs in _ABBREVIATIONS.items()
}
# Russian abbreviations carry no dot; upstream matches them as whole words instead.
_ABBREVIATION_RES["ru"] = [(re.compile(rf"\b{abbr}\b", re.IGNORECASE), word)
                           for abbr, word in [("г-жа", "госпожа"), ("г-н", "господин"), ("д-р", "доктор")]]


def expand_abbreviations(text: str, lang: str) -> str:
    for pattern, word in _ABBREVIATION_RES.get(lang, ()):
        text = pattern.sub(word, text)
    return text


# --------------------------------------------------------------------------------------------------------------
# Symbols, in the order & @ % # $ £ ° (whatever currency expansion left behind is read as a plain word).
# --------------------------------------------------------------------------------------------------------------
_SYMBOLS = "&@%#$£°"
_SYMBOL_WORDS = {
    "en": ("and", "at", "percent", "hash", "dollar", "pound", "degree"),
    "es": ("y", "arroba", "por ciento", "numeral", "dolar", "libra", "grados"),
    "fr": ("et", "arobase", "pour cent", "dièse", "dollar", "livre", "degrés"),
    "de": ("und", "at", "prozent", "raute", "dollar", "pfund", "grad"),
    "pt": ("e", "arroba", "por cento", "cardinal", "dólar", "libra", "graus"),
    "it": ("e", "chiocciola", "per cento", "cancelletto", "dollaro", "sterlina", "gradi"),
    "pl": ("i", "małpa", "procent", "krzyżyk", "dolar", "funt", "stopnie"),
    "ar": ("و", "على", "في المئة", "رقم", "دولار", "جنيه", "درجة"),
    "zh": ("和", "在", "百分之", "号", "美元", "英镑", "度"),
    "cs": ("a", "na", "procento", "křížek", "dolar", "libra", "stupně"),
    "ru": ("и", "собака", "процентов", "номер", "доллар", "фунт", "градус"),
    "nl": ("en", "bij", "procent", "hekje", "dollar", "pond", "graden"),
    "tr": ("ve", "at", "yüzde", "diyez", "dolar", "sterlin", "derece"),
    "hu": ("és", "kukac", "százalék", "kettőskereszt", "dollár", "font", "fok"),
    "ko": ("그리고", "에", "퍼센트", "번호", "달러", "파운드", "도"),
    "hi": ("और", "ऐट दी रेट", "प्रतिशत", "हैश", "डॉलर", "पाउंड", "डिग्री"),
}


def expand_symbols(text: str, lang: str) -> str:
    # Upstream also squeezes double spaces and strips here; the final whitespace collapse makes that redundant.
    for symbol, word in zip(_SYMBOLS, _SYMBOL_WORDS[lang]):
        text = text.replace(symbol, f" {word} ")
    return text


# --------------------------------------------------------------------------------------------------------------
# Numbers (every language but Chinese): currency > decimals > ordinals > cardinals.
# --------------------------------------------------------------------------------------------------------------
_ORDINAL_RES = {
    "en": r"([0-9]+)(st|nd|rd|th)",
    "es": r"([0-9]+)(º|ª|er|o|a|os|as)",
    "fr": r"([0-9]+)(º|ª|er|re|e|ème)",
    "de": r"([0-9]+)(st|nd|rd|th|º|ª|\.(?=\s|$))",
    "pt": r"([0-9]+)(º|ª|o|a|os|as)",
    "it": r"([0-9]+)(º|°|ª|o|a|i|e)",
    "pl": r"([0-9]+)(º|ª|st|nd|rd|th)",
    "ar": r"([0-9]+)(ون|ين|ث|ر|ى)",
    "cs": r"([0-9]+)\.(?=\s|$)",
    "ru": r"([0-9]+)(-й|-я|-е|-ое|-ье|-го)",
    "nl": r"([0-9]+)(de|ste|e)",
    "tr": r"([0-9]+)(\.|inci|nci|uncu|üncü)",
    "hu": r"([0-9]+)(\.|adik|edik|odik|ödik|ödike|ik)",
    "ko": r"([0-9]+)(번째|번|차|째)",
    "hi": r"([0-9]+)(st|nd|rd|th)",
}
_ORDINAL_RES = {lang: re.compile(pattern) for lang, pattern in _ORDINAL_RES.items()}
_NUMBER_RE = re.compile(r"[0-9]+")
_DECIMAL_RE = re.compile(r"[0-9]+[.,][0-9]+")
# Thousands separators: "1,234" (en, ru) and "1.234" (the rest). Upstream's dot pattern leaves the dot unescaped,
# so it matches any separator character; only dots are removed from what it matches.
_COMMA_GROUPED_RE = re.compile(r"\b\d{1,3}(,\d{3})*(\.\d+)?\b")
_DOT_GROUPED_RE = re.compile(r"\b\d{1,3}(.\d{3})*(,\d+)?\b")
_CURRENCIES = (  # upstream's order: pounds, then dollars, then euros; the symbol may stand before or after
    ("GBP", re.compile(r"£[0-9.,]*[0-9]+|[0-9.,]*[0-9]+£")),
    ("USD", re.compile(r"\$[0-9.,]*[0-9]+|[0-9.,]*[0-9]+\$")),
    ("EUR", re.compile(r"[0-9.,]*[0-9]+€|€[0-9.,]*[0-9]+")),
)
# What num2words puts between the main unit and the cents, cut off for whole amounts ("five dollars, zero cents").
_CENTS_JOINER = {"es": " con ", "fr": " et ", "de": " und ", "pt": " e ", "it": " e "}


def _spell(value, lang: str, what: str, written: str, **kwargs) -> str:
    """num2words, with its 'not implemented for this language' failures turned into an actionable input error.

    Upstream crashes here (e.g. Czech ordinals "1. května", or any digit in Hindi, for which num2words has no
    converter). We refuse the text with a clear message rather than guess a reading the model was never trained
    on: writing the number in words is a one-second fix for the user and gives the right grammatical form.
    """
    try:
        return num2words(value, lang=lang, **kwargs)
    except OverflowError as error:
        raise NarrateInputError(
            "text", f"the {what} {written!r} is too large to read out in {language_name(lang)} ({error}); write it "
                    f"in words or as smaller numbers") from error
    except Exception as error:  # NotImplementedError mostly; num2words also trips on e.g. Polish ordinal 0
        raise NarrateInputError(
            "text", f"cannot spell out the {what} {written!r}: num2words has no {language_name(lang)} reading for "
                    f"it ({type(error).__name__}); write it in words instead") from error


def _currency(match: re.Match, lang: str, code: str) -> str:
    amount = float(re.sub(r"[^\d.]", "", match.group(0).replace(",", ".")))
    words = num2words(amount, to="currency", currency=code, lang=lang)
    if amount.is_integer():  # "$5" -> "five dollars": drop the ", zero cents" tail
        cut = words.rfind(_CENTS_JOINER.get(lang, ", "))
        if cut != -1:
            words = words[:cut]
    return words


def expand_numbers(text: str, lang: str) -> str:
    if lang == "zh":
        return normalize_chinese(text)
    if lang in ("en", "ru"):
        text = _COMMA_GROUPED_RE.sub(lambda m: m.group(0).replace(",", ""), text)
    else:
        text = _DOT_GROUPED_RE.sub(lambda m: m.group(0).replace(".", ""), text)
    # Upstream swallows any currency failure (num2words lacks many currencies per language); the first failure
    # also skips the currencies after it.
    try:
        for code, pattern in _CURRENCIES:
            text = pattern.sub(lambda m: _currency(m, lang, code), text)
    except Exception:
        pass
    if lang != "tr":  # upstream never reads Turkish decimals
        text = _DECIMAL_RE.sub(
            lambda m: _spell(float(m.group(0).replace(",", ".")), lang, "decimal number", m.group(0)), text)
    text = _ORDINAL_RES[lang].sub(
        lambda m: _spell(int(m.group(1)), lang, "ordinal number", m.group(0), ordinal=True), text)
    return _NUMBER_RE.sub(lambda m: _spell(int(m.group(0)), lang, "number", m.group(0)), text)


# --------------------------------------------------------------------------------------------------------------
# Chinese: the rules of the TextNorm normaliser XTTS bundles (dates, money, phone numbers, fractions, percentages,
# numbers before measure words, long digit strings, plain numbers), then every punctuation mark becomes ",".
# Each rule finds all its matches first, then replaces the first occurrence of each matched string in turn.
# --------------------------------------------------------------------------------------------------------------
_ZH_DIGITS = "零一二三四五六七八九"
_ZH_UNITS = {1: "十", 2: "百", 3: "千", 4: "万", 8: "亿", 12: "兆", 16: "京", 20: "垓", 24: "秭", 28: "穰",
             32: "沟", 36: "涧", 40: "正", 44: "载"}  # the "mid" numbering system: 兆 = 亿·万
_ZH_POWERS = sorted(_ZH_UNITS, reverse=True)


def _zh_grouped(digits: str) -> list[tuple[str, int]]:
    """Symbols ("d", digit) / ("u", power) for an integer written with units, e.g. 1050 -> 一千零五十."""
    significant = digits.lstrip("0")
    if not significant:
        return []
    if len(significant) == 1:  # a zero is spoken when zeros were skipped before the last digit
        lead = [("d", 0)] if len(significant) != len(digits) else []
        return lead + [("d", int(significant))]
    power = next(p for p in _ZH_POWERS if p < len(significant))
    return _zh_grouped(digits[:-power]) + [("u", power)] + _zh_grouped(significant[-power:])


def zh_number(number: str, units: bool = True, liang: bool = True) -> str:
    """Read a decimal digit string ("2024", "3.5") in Chinese; units=False reads digit by digit."""
    whole, _, fraction = number.partition(".")
    symbols = _zh_grouped(whole) if units and len(whole) > 1 else [("d", int(c)) for c in whole]
    if fraction:
        symbols += [("p", 0)] + [("d", int(c)) for c in fraction]
    words = []
    for i, (kind, value) in enumerate(symbols):
        if kind == "u":
            words.append(_ZH_UNITS[value])
        elif kind == "p":
            words.append("点")
        else:
            after = symbols[i + 1] if i + 1 < len(symbols) else None
            before = symbols[i - 1] if i else None
            # 两 for a 2 before 百/千/万/..., unless it follows 十 or a non-unit (两千, 一万两千, but 二十)
            two_as_liang = (liang and value == 2 and after is not None and after[0] == "u" and after[1] != 1
                            and (before is None or (before[0] == "u" and before[1] != 1)))
            words.append("两" if two_as_liang else _ZH_DIGITS[value])
    text = "".join(words)
    if text.startswith("点"):
        text = "零" + text
    if text[:2] == "一十":  # 10..19 are read 十, 十一, ... without the leading 一
        text = text[1:]
    return text


def _zh_digits(number: str) -> str:
    return zh_number(number, units=False, liang=False)


def _zh_date(date: str) -> str:
    year, has_year, rest = date.partition("年")
    if not has_year:
        year, rest = "", date
    spoken = _zh_digits(year) + "年" if has_year else ""
    if rest:
        month, _, day = rest.partition("月")
        spoken += zh_number(month) + "月"
        if day:
            spoken += zh_number(day[:-1]) + day[-1]
    return spoken


def _zh_money(money: str) -> str:
    for number, _ in re.findall(r"(\d+(\.\d+)?)", money):
        money = money.replace(number, zh_number(number))
    return money


def _zh_phone(phone: str, fixed: bool) -> str:
    parts = phone.split("-") if fixed else phone.strip("+").split()
    return "".join(_zh_digits(part) for part in parts)


def _zh_fraction(fraction: str) -> str:
    numerator, denominator = fraction.split("/")
    return zh_number(denominator) + "分之" + zh_number(numerator)


_ZH_MAGNITUDE = "(?:亿|千万|百万|万|千|百)"
_ZH_MONEY_UNIT = f"(?:{_ZH_MAGNITUDE}|{_ZH_MAGNITUDE}?元|{_ZH_MAGNITUDE}?块|角|毛|分)"
_ZH_MEASURE_WORDS = (  # measure words after which a number is read as a quantity
    "(?:[丈世丘丝两个丸代令件伏位冬出刀分刻勺匹升单卮厘双叠口只合名周啖回场块坡堂堆墙壳壶夏夜天头季客家寸对寻尺尾层山岁岭常"
    "幢年座张忽户手扎打担挑捆撮支斗斛斤日旬时春曲更月本条杯板枝根桶棵毫江泡溪炮煲片瓶盆盏盒盘石砣碗碟秋秒程窠笼管箩箱篮簋"
    "粒纪线罐网罗群脚腔袋袭课贯贴跳身辆辈道里针钟钧钱钵铢铺锅锱阙队阵面页顶颗首]|[千毫微]克|[千分厘毫微]米)"
)
_ZH_RULES = (  # (pattern whose first group is the span to rewrite, rewrite)
    (re.compile(r"\D+((?:(?:[089]\d|(?:19|20)\d\d)年)?(?:\d{1,2}月(?:\d{1,2}[日号])?)?)"), _zh_date),
    (re.compile(rf"\D+(\d+(?:\.\d+)?[多余几]?{_ZH_MONEY_UNIT}(?:\d{_ZH_MONEY_UNIT}?)?)"), _zh_money),
    (re.compile(r"\D((?:\+?86 ?)?1(?:[38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D"), lambda s: _zh_phone(s, False)),
    (re.compile(r"\D((?:0(?:10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D"), lambda s: _zh_phone(s, True)),
    (re.compile(r"(\d+/\d+)"), _zh_fraction),
    (re.compile(r"(\d+(?:\.\d+)?%)"), lambda s: "百分之" + zh_number(s.strip().strip("%"))),
    (re.compile(rf"(\d+(?:\.\d+)?)[多余几]?{_ZH_MEASURE_WORDS}"), zh_number),
    (re.compile(r"(\d{4,32})"), _zh_digits),  # long digit strings (years, codes) are read digit by digit
    (re.compile(r"(\d+(?:\.\d+)?)"), zh_number),
    (re.compile(r"([a-zA-Z]+二[a-zA-Z]+)"), lambda s: s.replace("二", "2")),  # restore P2P, B2B, O2O
)
# Chinese punctuation (after the Zhon project) and ASCII punctuation: all read as a pause, ",".
_ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏·〈〉-" + string.punctuation
)
_ZH_PUNCTUATION_TO_COMMA = str.maketrans(_ZH_PUNCTUATION, "," * len(_ZH_PUNCTUATION))


def normalize_chinese(text: str) -> str:
    # Upstream brackets the text with "^" and "$" so the rules' \D can match at its edges, then strips those
    # characters off again: a "^" leading or "$" trailing the user's own text disappears with them.
    text = "^" + text + "$"
    text = text.replace("％", "%")
    for pattern, rewrite in _ZH_RULES:
        for span in pattern.findall(text):
            text = text.replace(span, rewrite(span), 1)
    text = text.lstrip("^").rstrip("$")
    return text.translate(_ZH_PUNCTUATION_TO_COMMA)
