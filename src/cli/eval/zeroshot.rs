//! `clasp eval zeroshot`: zero-shot classification accuracy with prompt ensembling.

use super::*;

pub(super) fn zeroshot(a: ZeroshotArgs) -> Result<ExitCode> {
    let t0 = Instant::now();
    let mut l = load(&a.common)?;
    let lang = lang_for(&a.lang, &l.encoder)?;
    let set = data::load_classification(&a.dataset)?;
    let names: Vec<String> = match &a.classes {
        Some(p) => {
            let lines = read_lines(p)?;
            if lines.iter().all(|l| l.contains('\t')) {
                let map: std::collections::HashMap<&str, &str> = lines
                    .iter()
                    .filter_map(|l| l.split_once('\t'))
                    .map(|(a, b)| (a.trim(), b.trim()))
                    .collect();
                set.classes
                    .iter()
                    .map(|c| {
                        map.get(c.as_str())
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| c.clone())
                    })
                    .collect()
            } else {
                if lines.len() != set.classes.len() {
                    bail!(
                        "{}: {} class names, but {} has {} class folders ({})",
                        p.display(),
                        lines.len(),
                        a.dataset.display(),
                        set.classes.len(),
                        set.classes.join(", ")
                    );
                }
                lines
            }
        }
        None => set
            .classes
            .iter()
            .map(|c| match lang {
                Lang::Zh => prompts::zh_name(c)
                    .map(str::to_string)
                    .unwrap_or_else(|| c.clone()),
                Lang::En => c.replace('_', " "),
            })
            .collect(),
    };
    let templates: Vec<String> = match &a.templates {
        Some(p) => read_lines(p)?,
        None => prompts::default_templates(lang == Lang::Zh),
    };
    if templates.is_empty() {
        bail!("no prompt templates");
    }
    let bar = BarProgress::default();
    let mut ctx = l.ctx(&bar);
    let z = eval::zeroshot::evaluate_zeroshot(&mut ctx, set, &names, &templates)?;
    let secs = t0.elapsed().as_secs_f64();
    let m = &z.metrics;
    let dataset = a.dataset.display().to_string();
    if a.common.json {
        let mut o = Map::new();
        o.insert("acc1".into(), json!(m.acc1));
        o.insert("acc5".into(), json!(m.acc5));
        o.insert(
            "mean_per_class_recall".into(),
            json!(m.mean_per_class_recall),
        );
        let per: Map<String, Value> = z
            .classes
            .iter()
            .zip(&m.per_class_recall)
            .map(|(c, r)| (c.clone(), json!(r)))
            .collect();
        o.insert("per_class_recall".into(), Value::Object(per));
        o.insert("n_images".into(), json!(z.n_images));
        o.insert("n_classes".into(), json!(z.classes.len()));
        o.insert("n_templates".into(), json!(templates.len()));
        o.insert("dataset".into(), json!(dataset));
        o.insert("model".into(), json!(a.common.model));
        o.insert("seconds".into(), json!(secs));
        print_json(o)?;
    } else {
        println!(
            "{dataset}: {} images, {} classes, {} templates ({secs:.1} s)",
            z.n_images,
            z.classes.len(),
            templates.len()
        );
        print!("top-1 {:.2}%", m.acc1 * 100.0);
        if let Some(a5) = m.acc5 {
            print!("   top-5 {:.2}%", a5 * 100.0);
        }
        println!(
            "   mean per-class recall {:.2}%",
            m.mean_per_class_recall * 100.0
        );
        for (c, r) in z.classes.iter().zip(&m.per_class_recall) {
            println!(
                "  {c:<20} {}",
                r.map(|x| format!("{:6.2}%", x * 100.0))
                    .unwrap_or_else(|| "     –".into())
            );
        }
    }
    if let Some(dir) = &a.common.report {
        report::zeroshot(dir, &a.common.model, &dataset, &z)?;
        note!("wrote {}", dir.join("report.md").display());
    }
    report_issues(&z.issues, a.common.json);
    Ok(exit_for(&z.issues))
}
