//! English nouns to their singular, by the rules of Pattern's `singularize`
//! (`pattern.en.inflect`, the copy TextBlob ships), quirks included: CHAIR's
//! code singularizes every caption word with it, so a hallucination rate that
//! is comparable with the papers' needs the same rules ("bus" becomes "bu"
//! and is never counted, "glass" becomes "glas", "minibuses" becomes "bus").
//! No Rust crate implements these rules (the `pluralizer` family follows the
//! JavaScript `pluralize` library, which differs), so they are written out
//! here; `tests/fixtures/eval/chair.json` holds TextBlob's answers for the
//! test.

use std::sync::OnceLock;

use regex::Regex;

const PREPOSITIONS: &[&str] = &[
    "about", "above", "across", "after", "among", "around", "at", "athwart", "before", "behind",
    "below", "beneath", "beside", "besides", "between", "betwixt", "beyond", "but", "by", "during",
    "except", "for", "from", "in", "into", "near", "of", "off", "on", "onto", "out", "over",
    "since", "till", "to", "under", "until", "unto", "upon", "with",
];

const UNINFLECTED: &[&str] = &[
    "aircraft",
    "antelope",
    "bison",
    "bream",
    "breeches",
    "britches",
    "carp",
    "cattle",
    "chassis",
    "clippers",
    "cod",
    "contretemps",
    "corps",
    "debris",
    "diabetes",
    "djinn",
    "eland",
    "elk",
    "flounder",
    "gallows",
    "georgia",
    "graffiti",
    "headquarters",
    "herpes",
    "high-jinks",
    "homework",
    "innings",
    "jackanapes",
    "jeans",
    "mackerel",
    "measles",
    "mews",
    "moose",
    "mumps",
    "news",
    "offspring",
    "pincers",
    "pliers",
    "proceedings",
    "rabies",
    "salmon",
    "scissors",
    "series",
    "shears",
    "species",
    "swine",
    "swiss",
    "trout",
    "tuna",
    "whiting",
    "wildebeest",
];

const UNCOUNTABLE: &[&str] = &[
    "advice",
    "bread",
    "butter",
    "cannabis",
    "cheese",
    "electricity",
    "equipment",
    "fruit",
    "furniture",
    "garbage",
    "gravel",
    "happiness",
    "information",
    "ketchup",
    "knowledge",
    "love",
    "luggage",
    "mathematics",
    "mayonnaise",
    "meat",
    "mustard",
    "news",
    "progress",
    "research",
    "rice",
    "sand",
    "software",
    "understanding",
    "water",
];

/// Words whose plural is word + "s" (the two with "^" never match: Pattern
/// keeps the anchor as a literal character).
const IE: &[&str] = &[
    "algerie", "auntie", "beanie", "birdie", "bogie", "bombie", "bookie", "collie", "cookie",
    "cutie", "doggie", "eyrie", "freebie", "goonie", "groupie", "hankie", "hippie", "hoagie",
    "hottie", "indie", "junkie", "laddie", "laramie", "lingerie", "meanie", "nightie", "oldie",
    "^pie", "pixie", "quickie", "reverie", "rookie", "softie", "sortie", "stoolie", "sweetie",
    "techie", "^tie", "toughie", "valkyrie", "veggie", "weenie", "yuppie", "zombie",
];

/// Words whose plural is word + "es"; a word that ends in one of these
/// plurals becomes the singular itself, whatever preceded it.
const S_SINGULAR: &[&str] = &[
    "acropolis",
    "aegis",
    "alias",
    "asbestos",
    "bathos",
    "bias",
    "bus",
    "caddis",
    "canvas",
    "chaos",
    "christmas",
    "cosmos",
    "dais",
    "digitalis",
    "epidermis",
    "ethos",
    "gas",
    "glottis",
    "ibis",
    "lens",
    "mantis",
    "marquis",
    "metropolis",
    "pathos",
    "pelvis",
    "polis",
    "rhinoceros",
    "sassafras",
    "trellis",
];

/// Plural ending → singular ending, tried in this order.
const IRREGULAR: &[(&str, &str)] = &[
    ("men", "man"),
    ("people", "person"),
    ("children", "child"),
    ("sexes", "sex"),
    ("axes", "axe"),
    ("moves", "move"),
    ("teeth", "tooth"),
    ("geese", "goose"),
    ("feet", "foot"),
    ("zoa", "zoon"),
    ("atlantes", "atlas"),
    ("atlases", "atlas"),
    ("beeves", "beef"),
    ("brethren", "brother"),
    ("corpora", "corpus"),
    ("corpuses", "corpus"),
    ("kine", "cow"),
    ("ephemerides", "ephemeris"),
    ("ganglia", "ganglion"),
    ("genii", "genie"),
    ("genera", "genus"),
    ("graffiti", "graffito"),
    ("helves", "helve"),
    ("leaves", "leaf"),
    ("loaves", "loaf"),
    ("lynxes", "lynx"),
    ("monies", "money"),
    ("mongooses", "mongoose"),
    ("mythoi", "mythos"),
    ("octopodes", "octopus"),
    ("opera", "opus"),
    ("opuses", "opus"),
    ("oxen", "ox"),
    ("penes", "penis"),
    ("penises", "penis"),
    ("soliloquies", "soliloquy"),
    ("testes", "testis"),
    ("trilbys", "trilby"),
    ("turves", "turf"),
    ("numena", "numen"),
    ("occipita", "occiput"),
    ("our", "my"),
];

/// The suffix rules, first match wins (Pattern's regexes; `${n}` for `\n`).
const RULES: &[(&str, &str)] = &[
    ("(?i)(.)ae$", "${1}a"),
    ("(?i)(.)itis$", "${1}itis"),
    ("(?i)(.)eaux$", "${1}eau"),
    ("(?i)(quiz)zes$", "${1}"),
    ("(?i)(matr)ices$", "${1}ix"),
    ("(?i)(ap|vert|ind)ices$", "${1}ex"),
    ("(?i)^(ox)en", "${1}"),
    ("(?i)(alias|status)es$", "${1}"),
    ("(?i)([octop|vir])i$", "${1}us"),
    ("(?i)(cris|ax|test)es$", "${1}is"),
    ("(?i)(shoe)s$", "${1}"),
    ("(?i)(o)es$", "${1}"),
    ("(?i)(bus)es$", "${1}"),
    ("(?i)([m|l])ice$", "${1}ouse"),
    ("(?i)(x|ch|ss|sh)es$", "${1}"),
    ("(?i)(m)ovies$", "${1}ovie"),
    ("(?i)(.)ombies$", "${1}ombie"),
    ("(?i)(s)eries$", "${1}eries"),
    ("(?i)([^aeiouy]|qu)ies$", "${1}y"),
    ("([aeo]l)ves$", "${1}f"),
    ("([^d]ea)ves$", "${1}f"),
    ("arves$", "arf"),
    ("erves$", "erve"),
    ("([nlw]i)ves$", "${1}fe"),
    ("(?i)([lr])ves$", "${1}f"),
    ("([aeo])ves$", "${1}ve"),
    ("(?i)(sive)s$", "${1}"),
    ("(?i)(tive)s$", "${1}"),
    ("(?i)(hive)s$", "${1}"),
    ("(?i)([^f])ves$", "${1}fe"),
    ("(?i)(^analy)ses$", "${1}sis"),
    (
        "(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$",
        "${1}${2}sis",
    ),
    ("(?i)(.)opses$", "${1}opsis"),
    ("(?i)(.)yses$", "${1}ysis"),
    ("(?i)(h|d|r|o|n|b|cl|p)oses$", "${1}ose"),
    (
        "(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$",
        "${1}ose",
    ),
    ("(?i)(.)oses$", "${1}osis"),
    ("(?i)([ti])a$", "${1}um"),
    ("(?i)(n)ews$", "${1}ews"),
    ("(?i)s$", ""),
];

fn rules() -> &'static [(Regex, &'static str)] {
    static RULES_RE: OnceLock<Vec<(Regex, &'static str)>> = OnceLock::new();
    RULES_RE.get_or_init(|| {
        RULES
            .iter()
            .map(|(p, r)| (Regex::new(p).expect("a valid suffix rule"), *r))
            .collect()
    })
}

/// `word`'s singular, as Pattern's `singularize(word)` gives it.
pub fn singularize(word: &str) -> String {
    // Compounds whose second part is a preposition: mothers-in-law.
    let parts: Vec<&str> = word.split('-').collect();
    if parts.len() > 1 && PREPOSITIONS.contains(&parts[1]) {
        return format!("{}-{}", singularize(parts[0]), parts[1..].join("-"));
    }
    if let Some(stem) = word.strip_suffix('\'') {
        return format!("{}'s", singularize(stem));
    }
    let lower = word.to_lowercase();
    // Pattern tests whether the listed word ends with the input, not the
    // reverse, so "on" or "s" come back unchanged too.
    if UNINFLECTED
        .iter()
        .chain(UNCOUNTABLE)
        .any(|w| w.ends_with(&lower))
    {
        return word.to_string();
    }
    if let Some(w) = IE.iter().find(|w| lower.ends_with(&format!("{w}s"))) {
        return w.to_string();
    }
    if let Some(w) = S_SINGULAR
        .iter()
        .find(|w| lower.ends_with(&format!("{w}es")))
    {
        return w.to_string();
    }
    if let Some((plural, singular)) = IRREGULAR.iter().find(|(p, _)| lower.ends_with(p)) {
        // The ending matched case-insensitively; cut as many characters.
        let keep = word.chars().count() - plural.chars().count();
        return word.chars().take(keep).collect::<String>() + singular;
    }
    for (re, with) in rules() {
        if re.is_match(word) {
            return re.replace_all(word, *with).into_owned();
        }
    }
    word.to_string()
}

#[cfg(test)]
mod tests {
    use super::singularize;

    #[test]
    fn pattern_rules_and_quirks() {
        for (plural, singular) in [
            ("dogs", "dog"),
            ("buses", "bus"),
            ("bus", "bu"),
            ("minibuses", "bus"),
            ("glasses", "glass"),
            ("glass", "glas"),
            ("women", "woman"),
            ("people", "person"),
            ("knives", "knife"),
            ("wolves", "wolf"),
            ("mice", "mouse"),
            ("puppies", "puppy"),
            ("doggies", "doggie"),
            ("sheep", "sheep"),
            ("scissors", "scissors"),
            ("on", "on"),
            ("your", "ymy"),
            ("mothers-in-law", "mother-in-law"),
            ("dogs'", "dog's"),
            ("oxen", "ox"),
            ("benches", "bench"),
        ] {
            assert_eq!(singularize(plural), singular, "{plural}");
        }
    }
}
