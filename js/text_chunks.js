// Sentence chunks as the Text BPE node cuts them: a line-for-line port of split_sentences in
// narrate_model/xtts/text.py, so the read-out in the browser counts the same chunks the node will speak.
// Pure functions, no imports: the frontend loads this file as an (empty) extension, the aids import it.

// XTTS's per-chunk character limits (upstream only warns above them; the audio tends to get cut short).
export const CHAR_LIMITS = {
  en: 250, de: 253, fr: 273, es: 239, it: 213, pt: 203, pl: 224, "zh-cn": 82, ar: 166, cs: 186, ru: 182, nl: 251,
  tr: 226, ja: 71, hu: 224, ko: 95, hi: 150,
};
const DEFAULT_LIMIT = 250;

// Python's whitespace (str.isspace, which is also what `\s` means in its str patterns); JS's \s and trim() differ
// in a few code points (\x1c-\x1f, \x85, \ufeff), and a different cut would give a different chunk count.
const WS = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const CLOSERS = "\"'”’»)\\]」』）";
const BREAKS = [ // cut after each match, coarsest first; whitespace stays with the piece before the cut
  new RegExp(`[.!?…؟।]+[${CLOSERS}]*(?:[${WS}]+|$)|[。！？｡]+[${CLOSERS}]*[${WS}]*|[${WS}]*\\n[${WS}]*`, "gu"),
  new RegExp(`[,;:–—،]+[${CLOSERS}]*[${WS}]+|[、，；：]+[${CLOSERS}]*[${WS}]*`, "gu"),
  new RegExp(`[${WS}]+`, "gu"),
];
const LEADING = new RegExp(`^[${WS}]+`, "u");
const TRAILING = new RegExp(`[${WS}]+$`, "u");

export const strip = (s) => s.replace(LEADING, "").replace(TRAILING, "");
const rstrip = (s) => s.replace(TRAILING, "");
// Python's len() counts code points, JS's .length UTF-16 units (an emoji is 2).
export const charCount = (s) => Array.from(s).length;

export function charLimit(language) {
  return CHAR_LIMITS[language] ?? CHAR_LIMITS[String(language).split("-")[0]] ?? DEFAULT_LIMIT;
}

function pieces(text, pattern) {
  const cuts = [...text.matchAll(pattern)].map((m) => m.index + m[0].length).filter((e) => e > 0 && e < text.length);
  const bounds = [0, ...cuts, text.length];
  const out = [];
  for (let i = 0; i + 1 < bounds.length; i++) if (bounds[i] < bounds[i + 1]) out.push(text.slice(bounds[i], bounds[i + 1]));
  return out;
}

function pack(text, limit, level = 0) {
  if (charCount(strip(text)) <= limit) return [text];
  if (level === BREAKS.length) { // one word longer than the limit: cut it (keeping the space that follows it)
    const word = Array.from(strip(text));
    const parts = [];
    for (let i = 0; i < word.length; i += limit) parts.push(word.slice(i, i + limit).join(""));
    parts[parts.length - 1] += text.slice(rstrip(text).length);
    return parts;
  }
  const chunks = [];
  let current = "";
  for (const piece of pieces(text, BREAKS[level])) {
    if (charCount(strip(current + piece)) <= limit) {
      current += piece;
      continue;
    }
    if (strip(current)) chunks.push(current);
    current = piece;
    if (charCount(strip(piece)) > limit) {
      const done = pack(piece, limit, level + 1);
      current = done.pop();
      chunks.push(...done);
    }
  }
  if (strip(current)) chunks.push(current);
  return chunks;
}

/** Chunks of at most `limit` characters (default: the language's limit), cut at sentence ends, then clause
 * punctuation, then between words; whitespace at the cuts is dropped. Same result as the Python splitter. */
export function splitSentences(text, language, limit = charLimit(language)) {
  return pack(text, limit).map(strip).filter(Boolean);
}

// Speaking rate for the duration estimate: about 14 characters per second for English (150 words a minute at
// ~5.6 characters a word, spaces included). Other languages scale by their XTTS limit, on the assumption that
// upstream sized each limit to about the same stretch of speech (~18 s); that gives ~4 characters/s for Japanese
// and ~4.6 for Chinese, in line with their syllable rates. An estimate (+-30%): the synthesizer's codes decide.
export const EN_CHARS_PER_SECOND = 14;

export function charsPerSecond(language) {
  return EN_CHARS_PER_SECOND * charLimit(language) / CHAR_LIMITS.en;
}

/** What the read-out shows, computed the way the Text BPE node chunks the text (tokenize() strips it first);
 * `speed` is the synthesizer's speaking speed (1 = natural, 1.25 = a quarter faster). */
export function textStats(text, language, split = true, fps = 25, speed = 1) {
  const limit = charLimit(language);
  const stripped = strip(String(text ?? ""));
  const chunks = !stripped ? [] : split ? splitSentences(stripped, language, limit) : [stripped];
  const lengths = chunks.map(charCount);
  const chars = lengths.reduce((a, b) => a + b, 0);
  const seconds = chars / charsPerSecond(language) / speed;
  return {
    chars, limit, chunks: chunks.length, longest: Math.max(0, ...lengths),
    overLimit: lengths.filter((n) => n > limit).length, seconds, fps, speed, frames: Math.ceil(seconds * fps),
  };
}
