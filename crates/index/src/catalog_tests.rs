//! Unit tests of `catalog` (kept beside it, in their own file).
use super::*;

fn row(path: &str, hash: u8) -> FileRow {
    FileRow {
        path: path.into(),
        size: 1,
        mtime_ns: 2,
        hash: Some([hash; 32]),
        error: None,
        caption: format!("caption of {path}"),
    }
}

#[test]
fn files_vectors_moves_and_orphans() {
    let d = tempfile::tempdir().unwrap();
    let mut c = Catalog::open(&d.path().join("s.sqlite")).unwrap();
    let m = c.model_id(&[9; 32], "tiny", 2).unwrap();
    assert_eq!(
        c.model_id(&[9; 32], "tiny", 2).unwrap(),
        m,
        "same model, same id"
    );
    c.write(|w| {
        w.upsert_file(&row("/a/x.jpg", 1))?;
        w.upsert_file(&row("/a/y.jpg", 2))?;
        w.put_vector(m, &[1; 32], &[1.0, 0.0])?;
        w.put_vector(m, &[2; 32], &[0.0, 1.0])
    })
    .unwrap();
    assert_eq!(c.generation().unwrap(), 1);
    assert!(c.check(Some(m)).unwrap().is_empty());
    c.write(|w| {
        w.move_file("/a/x.jpg", &row("/b/x.jpg", 1))?;
        w.remove_file("/a/y.jpg")?;
        w.drop_orphan_vectors()
    })
    .unwrap();
    let files = c.files_under(&[]).unwrap();
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        vec!["/b/x.jpg"]
    );
    assert_eq!(c.model_vectors(m).unwrap().len(), 1);
    assert!(c.check(Some(m)).unwrap().is_empty());
    assert_eq!(c.text_search("caption x.jpg!", 5).unwrap()[0].0, "/b/x.jpg");
    assert!(under("/b/x.jpg", "/b") && !under("/bb/x.jpg", "/b"));
}

/// The description leaves out the file-name words that end every search
/// text, and is None when nothing else describes the file.
#[test]
fn descriptions_drop_the_file_name_words() {
    let d = tempfile::tempdir().unwrap();
    let mut c = Catalog::open(&d.path().join("s.sqlite")).unwrap();
    let mut with = row("/a/dog_run.jpg", 1);
    with.caption = "a dog runs\nby the sea\ndog run".into();
    let mut bare = row("/a/x.jpg", 2);
    bare.caption = "x".into();
    c.write(|w| {
        w.upsert_file(&with)?;
        w.upsert_file(&bare)
    })
    .unwrap();
    let desc = c.description_of("/a/dog_run.jpg").unwrap();
    assert_eq!(desc.as_deref(), Some("a dog runs\nby the sea"));
    assert_eq!(c.description_of("/a/x.jpg").unwrap(), None);
    assert_eq!(c.description_of("/a/none.jpg").unwrap(), None);
}
