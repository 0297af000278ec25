//! Parsers for command-line values.

/// Sizes: `1024`, `64k`, `256M`, `1.5G`, `512Mi`, `2GiB` (powers of 1024).
pub fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size '{s}': use e.g. 256M or 1G"))?;
    let unit = unit.to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("invalid size unit in '{s}': use K, M, G or T")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("size '{s}' is out of range"));
    }
    Ok(v as u64)
}

/// Durations in seconds: `90`, `30s`, `10m`, `1h30m`, `2d`, `0`.
pub fn duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration: use e.g. 30s, 10m, 1h30m (0 for none)".into());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    // Units from the largest down, each at most once: `1h30m`, not `30m1h` or `1h1h`.
    let mut last = u64::MAX;
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mult = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(format!("invalid duration '{s}': use e.g. 30s, 10m, 1h30m")),
        };
        if mult >= last {
            return Err(format!("invalid duration '{s}': units go from the largest down, each once (e.g. 1h30m)"));
        }
        last = mult;
        let n: u64 = num.parse().map_err(|_| format!("invalid duration '{s}': use e.g. 30s, 10m, 1h30m"))?;
        total = total.saturating_add(n.saturating_mul(mult));
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!("invalid duration '{s}': a number needs a unit (s, m, h, d)"));
    }
    Ok(total)
}

/// A command's timeout in seconds: `300ms`, `1.5s`, `2.5` (seconds), or a duration as
/// [`duration`] takes it (`30s`, `10m`, `1h30m`); more than zero.
pub fn exec_timeout(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let secs = if let Some(ms) = t.strip_suffix("ms") {
        ms.parse::<f64>()
            .map(|v| v / 1000.0)
            .map_err(|_| format!("invalid timeout '{s}': use e.g. 300ms, 1.5s, 10m"))?
    } else if let Ok(v) = t.strip_suffix('s').unwrap_or(t).parse::<f64>() {
        v
    } else {
        duration(t)? as f64
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("invalid timeout '{s}': it must be more than zero"));
    }
    Ok(secs)
}

/// A stop's grace time: a finite number of seconds from 0 to 3600 (`nan` and `inf`,
/// which Rust parses as numbers, would reach the daemon as null: its default).
pub fn grace_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && (0.0..=3600.0).contains(&t) => Ok(t),
        _ => Err(format!("'{s}' is not a number of seconds from 0 to 3600")),
    }
}

/// `KEY=VALUE`.
pub fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

/// Human-readable size.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[i]) }
}

/// "5s ago", "in 10m" relative to now.
pub fn relative(t: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (d, future) = if t > now { (t - now, true) } else { (now - t, false) };
    let s = match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        3600..86400 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    };
    if future { format!("in {s}") } else { format!("{s} ago") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("1024").unwrap(), 1024);
        assert_eq!(size("256M").unwrap(), 256 << 20);
        assert_eq!(size("1.5G").unwrap(), 3 << 29);
        assert_eq!(size("512Mi").unwrap(), 512 << 20);
        assert_eq!(size("2GiB").unwrap(), 2 << 30);
        assert!(size("12X").unwrap_err().contains("12X"));
        assert!(size("abc").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("90").unwrap(), 90);
        assert_eq!(duration("10m").unwrap(), 600);
        assert_eq!(duration("1h30m").unwrap(), 5400);
        assert_eq!(duration("0").unwrap(), 0);
        assert!(duration("10").is_ok());
        assert!(duration("5x").is_err());
        assert!(duration("1h5").is_err());
        assert!(duration("").unwrap_err().contains("empty"));
        assert!(duration(" ").is_err());
        assert!(duration("1h1h").unwrap_err().contains("each once"));
        assert!(duration("30m1h").is_err());
        assert_eq!(duration("1d2h3m4s").unwrap(), 93784);
    }

    #[test]
    fn exec_timeouts() {
        assert_eq!(exec_timeout("300ms").unwrap(), 0.3);
        assert_eq!(exec_timeout("1.5s").unwrap(), 1.5);
        assert_eq!(exec_timeout("2.5").unwrap(), 2.5);
        assert_eq!(exec_timeout("30s").unwrap(), 30.0);
        assert_eq!(exec_timeout("1h30m").unwrap(), 5400.0);
        assert!(exec_timeout("0").unwrap_err().contains("more than zero"));
        assert!(exec_timeout("0ms").is_err());
        assert!(exec_timeout("inf").is_err());
        assert!(exec_timeout("-1s").is_err());
        assert!(exec_timeout("5x").is_err());
        assert!(exec_timeout("xms").unwrap_err().contains("300ms"));
    }

    #[test]
    fn key_values() {
        assert_eq!(key_value("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(key_value("=x").is_err());
        assert!(key_value("noequals").is_err());
    }

    #[test]
    fn grace_times_are_finite_and_in_range() {
        assert_eq!(grace_secs("0").unwrap(), 0.0);
        assert_eq!(grace_secs("2.5").unwrap(), 2.5);
        assert_eq!(grace_secs("3600").unwrap(), 3600.0);
        for bad in ["nan", "NaN", "inf", "-inf", "infinity", "-1", "3601", "", "ten"] {
            assert!(grace_secs(bad).is_err(), "{bad}");
        }
    }
}
