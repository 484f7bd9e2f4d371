//! Exact money and quantity types. Parsing is strict: plain ASCII decimal notation only, so
//! "1e3", "NaN", " 1", "+1", "١٠" and the like are refused before anything else happens.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

use super::ids::FieldError;

/// Cents: USD amounts carry at most 2 decimals.
pub const USD_SCALE: u32 = 2;
/// Quantities and prices carry at most 8 decimals (satoshi precision).
pub const QUANTITY_SCALE_MAX: u32 = 8;
pub const PRICE_SCALE_MAX: u32 = 8;
/// Longest decimal string accepted on the wire; far above any valid value, and keeps parsing
/// inside `Decimal`'s 28 significant digits.
pub const DECIMAL_TEXT_LENGTH_MAX: usize = 24;
/// One Deposit or Withdraw moves at most this much, in USD (the original system's rule).
pub const CASH_AMOUNT_USD_MAX: Decimal = Decimal::from_parts(100_000_000, 0, 0, false, 2);
/// One order is worth at most this much, in USD.
pub const ORDER_VALUE_USD_MAX: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 2);
/// Default smallest order value, in USD (`--min-order-value`). Retail brokers require about this
/// much for fractional orders, and it bounds what rounding can move per order: at most one cent,
/// always against the customer, on an order worth at least a dollar.
pub const ORDER_VALUE_USD_MIN: Decimal = Decimal::from_parts(100, 0, 0, false, 2);
/// Smallest tradable quantity.
pub const QUANTITY_MIN: Decimal = Decimal::from_parts(1, 0, 0, false, 3);

const _: () = assert!(USD_SCALE <= QUANTITY_SCALE_MAX);

/// Parses plain decimal notation (`123`, `0.5`, `10.25`) with at most `scale_max` decimals.
fn parse_plain_decimal(field: &'static str, raw: &str, scale_max: u32) -> Result<Decimal, FieldError> {
    let shape = "must be a plain decimal number such as 100.00";
    if raw.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if raw.len() > DECIMAL_TEXT_LENGTH_MAX {
        return Err(FieldError::new(
            field,
            format!("must be at most {DECIMAL_TEXT_LENGTH_MAX} characters"),
        ));
    }
    if raw.starts_with('-') {
        return Err(FieldError::new(field, "must be greater than 0"));
    }
    let (whole, fraction) = match raw.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (raw, None),
    };
    let digits_only = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !digits_only(whole) || fraction.is_some_and(|f| !digits_only(f)) {
        return Err(FieldError::new(field, shape));
    }
    let scale = fraction.map_or(0, str::len);
    if scale > scale_max as usize {
        return Err(FieldError::new(
            field,
            format!("must have at most {scale_max} decimal places"),
        ));
    }
    Decimal::from_str_exact(raw).map_err(|_| FieldError::new(field, shape))
}

/// A non-negative USD amount with exactly 2 decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Usd(Decimal);

impl Usd {
    pub const ZERO: Usd = Usd(Decimal::ZERO);
    /// The smallest positive amount: one cent.
    pub const CENT: Usd = Usd(Decimal::from_parts(1, 0, 0, false, USD_SCALE));

    /// A Deposit or Withdraw amount: > 0, at most 2 decimals, at most `CASH_AMOUNT_USD_MAX`.
    pub fn parse_amount(field: &'static str, raw: &str) -> Result<Self, FieldError> {
        let value = parse_plain_decimal(field, raw, USD_SCALE)?;
        if value <= Decimal::ZERO {
            return Err(FieldError::new(field, "must be greater than 0"));
        }
        if value > CASH_AMOUNT_USD_MAX {
            return Err(FieldError::new(
                field,
                format!("must be at most {}", Usd(CASH_AMOUNT_USD_MAX)),
            ));
        }
        Ok(Self::from_decimal(value))
    }

    /// Wraps a value computed or stored by Lockstep itself; rounds to cents half-even.
    pub fn from_decimal(value: Decimal) -> Self {
        Self::rounded(value, RoundingStrategy::MidpointNearestEven)
    }

    fn rounded(value: Decimal, strategy: RoundingStrategy) -> Self {
        let mut rounded = value.round_dp_with_strategy(USD_SCALE, strategy);
        rounded.rescale(USD_SCALE);
        Self(rounded)
    }

    /// Rebuilds an amount read back from storage: None for anything negative (a `Usd` never is).
    pub fn from_stored(raw: &str) -> Option<Self> {
        Decimal::from_str(raw)
            .ok()
            .filter(|value| !value.is_sign_negative())
            .map(Self::from_decimal)
    }

    pub fn decimal(self) -> Decimal {
        self.0
    }

    /// `value` rounded UP to the cent (against a buyer); a negative value is zero.
    pub fn ceil(value: Decimal) -> Self {
        Self::rounded(value.max(Decimal::ZERO), RoundingStrategy::AwayFromZero)
    }

    /// `value` rounded DOWN to the cent (against a seller); a negative value is zero.
    pub fn floor(value: Decimal) -> Self {
        Self::rounded(value.max(Decimal::ZERO), RoundingStrategy::ToZero)
    }

    pub fn checked_add(self, other: Usd) -> Option<Usd> {
        self.0.checked_add(other.0).map(Usd)
    }

    /// `self - other`, or None if that would be negative (or overflow).
    pub fn checked_sub(self, other: Usd) -> Option<Usd> {
        self.0
            .checked_sub(other.0)
            .filter(|value| !value.is_sign_negative())
            .map(Usd)
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A signed USD amount with exactly 2 decimals: how much a ledger entry changes cash, e.g.
/// `-72.62` for a buy, `50.00` for a deposit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UsdDelta(Decimal);

impl UsdDelta {
    pub const ZERO: UsdDelta = UsdDelta(Decimal::ZERO);

    /// Cash coming in.
    pub fn credit(amount: Usd) -> Self {
        Self(amount.0)
    }

    /// Cash going out.
    pub fn debit(amount: Usd) -> Self {
        Self(-amount.0)
    }

    /// Rebuilds a delta read back from storage (rounded to cents).
    pub fn from_stored(raw: &str) -> Option<Self> {
        let mut value = Decimal::from_str(raw).ok()?;
        value = value.round_dp_with_strategy(USD_SCALE, RoundingStrategy::MidpointNearestEven);
        value.rescale(USD_SCALE);
        Some(Self(value))
    }

    pub fn decimal(self) -> Decimal {
        self.0
    }

    /// The amount taken out, if this is a debit.
    pub fn debited(self) -> Usd {
        Usd::from_decimal((-self.0).max(Decimal::ZERO))
    }
}

impl fmt::Display for UsdDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut value = self.0;
        value.rescale(USD_SCALE);
        write!(f, "{value}")
    }
}

/// A quantity of an asset: at most 8 decimals. Trade quantities are also >= `QUANTITY_MIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Quantity(Decimal);

impl Quantity {
    pub const ZERO: Quantity = Quantity(Decimal::ZERO);

    pub fn parse_trade(field: &'static str, raw: &str) -> Result<Self, FieldError> {
        let value = parse_plain_decimal(field, raw, QUANTITY_SCALE_MAX)?;
        if value < QUANTITY_MIN {
            return Err(FieldError::new(field, format!("must be at least {QUANTITY_MIN}")));
        }
        Ok(Self(value.normalize()))
    }

    pub fn from_stored(raw: &str) -> Option<Self> {
        Decimal::from_str(raw).ok().map(|value| Self(value.normalize()))
    }

    /// Wraps a quantity computed by Lockstep itself (a sum of parsed quantities).
    pub fn from_decimal(value: Decimal) -> Self {
        Self(value.normalize())
    }

    pub fn decimal(self) -> Decimal {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    pub fn checked_add(self, other: Quantity) -> Option<Quantity> {
        self.0.checked_add(other.0).map(|value| Quantity(value.normalize()))
    }

    pub fn checked_sub(self, other: Quantity) -> Option<Quantity> {
        self.0.checked_sub(other.0).map(|value| Quantity(value.normalize()))
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A unit price in USD: > 0, at most 8 decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Price(Decimal);

impl Price {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldError> {
        let value = parse_plain_decimal(field, raw, PRICE_SCALE_MAX)?;
        if value <= Decimal::ZERO {
            return Err(FieldError::new(field, "must be greater than 0"));
        }
        Ok(Self(value.normalize()))
    }

    pub fn from_stored(raw: &str) -> Option<Self> {
        Decimal::from_str(raw)
            .ok()
            .filter(|value| *value > Decimal::ZERO)
            .map(|value| Self(value.normalize()))
    }

    pub fn decimal(self) -> Decimal {
        self.0
    }

    /// What a buyer pays for `quantity` at this price: `quantity × price` rounded UP to the cent.
    ///
    /// Totals round against the customer on both sides, so that no split of a quantity into
    /// orders at one price gains cash: the proceeds of selling any split never exceed the cost
    /// of buying the whole (`Σ⌊p·qᵢ⌋ ≤ p·Σqᵢ ≤ ⌈p·Σqᵢ⌉`). Half-even rounding on both sides let a
    /// customer buy lots whose totals round down and sell lots whose totals round up.
    pub fn cost_of(self, quantity: Quantity) -> Option<Usd> {
        self.exact_value(quantity)
            .map(|value| Usd::rounded(value, RoundingStrategy::AwayFromZero))
    }

    /// What a seller receives for `quantity` at this price: `quantity × price` rounded DOWN to
    /// the cent (see `cost_of`). May be 0.00; `decide` refuses such a sell.
    pub fn proceeds_of(self, quantity: Quantity) -> Option<Usd> {
        self.exact_value(quantity)
            .map(|value| Usd::rounded(value, RoundingStrategy::ToZero))
    }

    /// `quantity × price`, unrounded. Exact for every order value up to far beyond
    /// `ORDER_VALUE_USD_MAX`: both factors have at most 8 decimals, so the product has at most
    /// 16, well within `Decimal`'s 28 significant digits.
    pub fn exact_value(self, quantity: Quantity) -> Option<Decimal> {
        self.0.checked_mul(quantity.0)
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(Usd::parse_amount("amount", "100").unwrap().to_string(), "100.00");
        assert_eq!(Usd::parse_amount("amount", "0.01").unwrap().to_string(), "0.01");
        assert_eq!(
            Usd::parse_amount("amount", "1000000.00").unwrap().to_string(),
            "1000000.00"
        );
    }

    #[test]
    fn amounts_refuse_every_bad_shape() {
        for bad in [
            "",
            "0",
            "0.00",
            "-1",
            "-0.01",
            "1e3",
            "NaN",
            "inf",
            " 1",
            "1 ",
            "+1",
            "1.",
            ".5",
            "0.001",
            "1,000",
            "١٠",
            "1000000.01",
            "12.345",
            "0x10",
        ] {
            assert!(Usd::parse_amount("amount", bad).is_err(), "{bad:?} should be refused");
        }
    }

    fn cost_and_proceeds(price: &str, quantity: &str) -> (String, String) {
        let price = Price::parse("price", price).unwrap();
        let quantity = Quantity::parse_trade("quantity", quantity).unwrap();
        (
            price.cost_of(quantity).unwrap().to_string(),
            price.proceeds_of(quantity).unwrap().to_string(),
        )
    }

    #[test]
    fn costs_round_up_and_proceeds_round_down_to_cents() {
        // (price, quantity, cost, proceeds): exact values stay exact; anything between two
        // cents costs the upper one and pays the lower one, half-way points included.
        for (price, quantity, cost, proceeds) in [
            ("0.5", "0.01", "0.01", "0.00"),
            ("0.5", "0.03", "0.02", "0.01"),
            ("0.5", "0.05", "0.03", "0.02"),
            ("0.5", "0.07", "0.04", "0.03"),
            ("0.5", "0.04", "0.02", "0.02"),
            ("0.45", "0.996", "0.45", "0.44"),
            ("0.45", "0.012", "0.01", "0.00"),
            ("145.25", "0.5", "72.63", "72.62"),
            ("145.25", "2", "290.50", "290.50"),
            ("0.00000001", "0.001", "0.01", "0.00"),
            ("10", "1", "10.00", "10.00"),
        ] {
            assert_eq!(
                cost_and_proceeds(price, quantity),
                (cost.to_owned(), proceeds.to_owned()),
                "{quantity} at {price}"
            );
        }
    }

    /// `Usd` is never negative, whatever it is made from; a signed change is a `UsdDelta`.
    #[test]
    fn usd_is_never_negative_and_deltas_carry_the_sign() {
        let ten = Usd::parse_amount("amount", "10").unwrap();
        let twenty = Usd::parse_amount("amount", "20").unwrap();
        assert_eq!(ten.checked_sub(twenty), None);
        assert_eq!(twenty.checked_sub(ten), Some(ten));
        assert_eq!(Usd::from_stored("-5"), None);
        assert_eq!(Usd::from_stored("5").unwrap().to_string(), "5.00");
        assert_eq!(UsdDelta::debit(ten).to_string(), "-10.00");
        assert_eq!(UsdDelta::credit(ten).to_string(), "10.00");
        assert_eq!(UsdDelta::debit(ten).debited(), ten);
        assert_eq!(UsdDelta::credit(ten).debited(), Usd::ZERO);
        assert_eq!(UsdDelta::from_stored("-72.625").unwrap().to_string(), "-72.62");
        assert_eq!(UsdDelta::from_stored("abc"), None);
    }

    #[test]
    fn quantities_have_a_floor_and_a_scale() {
        assert!(Quantity::parse_trade("quantity", "0.001").is_ok());
        assert!(Quantity::parse_trade("quantity", "0.0009").is_err());
        assert!(Quantity::parse_trade("quantity", "1.123456789").is_err());
        assert_eq!(Quantity::parse_trade("quantity", "2.50").unwrap().to_string(), "2.5");
    }
}
