use super::*;

#[test]
fn an_arc_is_nine_contiguous_circle_pixels_wrapping_around() {
    let cases: [(&str, u32, bool); 6] = [
        ("nine from the top", 0b1_1111_1111, true),
        ("eight", 0b1111_1111, false),
        ("nine across the wrap", 0xf01f, true),
        ("nine split by a gap", 0xf7c0, false),
        ("all sixteen", 0xffff, true),
        ("none", 0, false),
    ];
    for (case, mask, want) in cases {
        assert_eq!(has_arc(mask), want, "{case}");
    }
}

/// A picture with corners: a grid of bright squares on dark, with a ramp so no two look alike.
fn squares(width: u32, height: u32) -> Vec<u8> {
    (0..height)
        .flat_map(|y| (0..width).map(move |x| (x, y)))
        .flat_map(|(x, y)| {
            let inside = (x / 23 + y / 17) % 3 == 0 && x % 23 > 4 && y % 17 > 3;
            let v = if inside { 200 - ((x * 7 + y * 3) % 60) as u8 } else { 30 + ((x + y) % 20) as u8 };
            [v, v, v]
        })
        .collect()
}

#[test]
fn the_stored_form_round_trips_and_bad_forms_are_refused() {
    let points = Keypoints::of_rgb(300, 200, &squares(300, 200));
    assert!(points.len() > 50, "{} keypoints", points.len());
    assert!(points.len() <= MAX_POINTS);
    assert_eq!(Keypoints::decode(&points.encode()).unwrap(), points);
    let json = serde_json::to_string(&points).unwrap();
    assert_eq!(serde_json::from_str::<Keypoints>(&json).unwrap(), points);

    let nan = BASE64.encode([f32::NAN.to_le_bytes().as_slice(), &[0; 36]].concat());
    let cases: [(&str, String, KeypointsError); 3] = [
        ("not base64", "***".into(), KeypointsError::Encoding("Invalid symbol 42, offset 0.".into())),
        ("a partial record", BASE64.encode([0u8; 41]), KeypointsError::Length(41)),
        ("a position that is not a number", nan, KeypointsError::Position(0)),
    ];
    for (case, text, want) in cases {
        assert_eq!(Keypoints::decode(&text), Err(want), "{case}");
    }
}

#[test]
fn flat_and_tiny_images_have_no_keypoints() {
    assert!(Keypoints::of_rgb(300, 200, &[90; 300 * 200 * 3]).is_empty());
    assert!(Keypoints::of_rgb(30, 30, &squares(30, 30)).is_empty());
    assert!(Keypoints::of_rgb(300, 200, &[0; 5]).is_empty(), "a buffer of the wrong size");
}

#[test]
fn the_same_pixels_give_the_same_keypoints_and_verify_against_themselves() {
    let pixels = squares(300, 200);
    let (a, b) = (Keypoints::of_rgb(300, 200, &pixels), Keypoints::of_rgb(300, 200, &pixels));
    assert_eq!(a, b);
    assert!(verify(&a, &b) as usize > a.len() / 2, "{} of {}", verify(&a, &b), a.len());
    assert_eq!(verify(&a, &Keypoints::default()), 0);
}
